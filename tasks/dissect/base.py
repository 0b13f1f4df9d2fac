"""The one verb every neuron labeller answers: a model's layers and the probe set in, unit labels out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd

from tasks.core.config import AuditConfig
from tasks.dissect.probe import Probe


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
        :class:`tasks.data.models.LoadedModel`."""
