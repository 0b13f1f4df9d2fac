"""The one verb every neuron labeller answers: a model's layers and the probe set in, unit labels out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd

from xai_audit.tasks.core.config import AuditConfig
from xai_audit.tasks.dissect.probe import Probe


def counts_for_concept(neurons: pd.DataFrame) -> pd.Series:
    """Which ``neurons`` rows count for their top-1 concept: every CLIP-Dissect label, and a Network
    Dissection label unless the unit is not interpretable (best IoU below iou_threshold: no
    concept in Bau et al.'s sense)."""
    return neurons["concept"].notna() & ((neurons["method"] != "netdissect") | ~neurons["interpretable"].eq(False))


@dataclass
class Labels:
    """One labelling pass: ``neurons`` rows per layer, and ``errors`` rows of what it left out."""

    frames: dict[str, pd.DataFrame]
    errors: list[dict] = field(default_factory=list)


class Labeller(ABC):
    """A neuron-labelling method.

    ``fan_out`` tells the dissect flow how to cut the work: ``layer`` runs one work unit per
    missing layer (their activations come from one cached pass, so units are cheap and retry
    alone); ``model`` runs every missing layer in one unit, because its passes over the probe set
    are shared by all layers.
    """

    name: str = ""
    fan_out: Literal["layer", "model"] = "layer"

    @abstractmethod
    def label(self, config: AuditConfig, model: Any, all_layers: list[str], layers: list[str], probe: Probe) -> Labels:
        """Labels of ``layers`` (a subset of the model's labelled ``all_layers``) of ``model``, a
        :class:`xai_audit.tasks.data.models.LoadedModel`."""
