"""The one verb every explainer answers, and what it gets and gives.

An explainer is a *family* of methods that may share work (the gradient CAMs share one
forward/backward pass): the explain stage groups the configured methods by family and calls
each family once per batch, so it never branches on a method name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from xai_audit.tasks.core.config import ExplainConfig
from xai_audit.tasks.core.errors import ItemError
from xai_audit.tasks.data.layer_layout import LayerLayout


@dataclass(frozen=True)
class ExplainContext:
    """What an explainer may use besides the images: the model, its CAM layer and the run's settings.

    ``model`` is a :class:`xai_audit.tasks.data.models.LoadedModel` (``module`` takes normalised inputs,
    ``pixel_model`` takes [0, 1] pixels).
    """

    model: Any
    layer: nn.Module
    settings: ExplainConfig
    seed: int
    amp_dtype: torch.dtype | None
    image_ids: Sequence[str]
    """The batch's image ids, for error rows and extra table rows."""
    layout: LayerLayout | None = None
    """How ``layer``'s output becomes ``[B, C, h, w]`` maps (grad-cam's reshape transform); None: NCHW."""


@dataclass
class Explanations:
    """One batch's maps by method, the images a method failed on, and extra table rows."""

    maps: dict[str, np.ndarray]
    """``{method: float32 [B, H, W]}``; a failed image's map is NaN."""
    failed: dict[int, ItemError] = field(default_factory=dict)
    """Batch index -> why the family could not explain that image."""
    rows: dict[str, list[dict]] = field(default_factory=dict)
    """Rows for other tables of the chunk (LIME's search writes ``lime_trials``)."""


class Explainer(ABC):
    """A family of explanation methods: a batch of images and per-image targets in, one map per image and method out."""

    methods: tuple[str, ...] = ()
    """The config names this family answers."""
    road: bool = True
    """Whether ROAD (grad-cam's metric, ``explain.metrics.road``) scores this family's maps."""
    control: bool = False
    """A control: maps that carry no information about the model, the floor every real method must beat."""

    @abstractmethod
    def explain(
        self, context: ExplainContext, images: Tensor, targets: Sequence[int], methods: Sequence[str]
    ) -> Explanations:
        """Maps of ``images`` (preprocessed ``[B, 3, H, W]`` on the model's device) for ``targets``
        (one class per image), for each of ``methods`` (a subset of :attr:`methods`)."""
