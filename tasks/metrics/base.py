"""What a metric is: a procedure over a batch's stored maps that says what it measures.

Like Quantus's metrics, each one declares its category and, for every value it writes, the
direction in which it is better; leaderboards, figures, drift arrows and the report read those
declarations instead of prose. A metric writes rows of its own table (``table``); a metric
without a contract table of its own writes the long ``scores`` table (one row per image,
method and value), and its per-method mean reaches ``summary_methods.scores``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from xai_audit.tasks.core.config import MetricsConfig

Direction = Literal["higher", "lower"]
ARROWS: dict[str, str] = {"higher": "↑", "lower": "↓"}


@dataclass(frozen=True)
class Score:
    """One value a metric writes, and how the leaderboard reads it."""

    column: str
    """Its column in the metric's table (for ``scores``-table metrics, its ``metric`` name)."""
    summary: str
    """Its per-method aggregate in ``summary_methods`` (for ``scores``-table metrics, the key in ``scores``)."""
    direction: Direction
    label: str
    """Short human name for figures and the report."""

    @property
    def arrow(self) -> str:
        return ARROWS[self.direction]


@dataclass(frozen=True)
class ScoredBatch:
    """A batch of explained images as the metrics see it: maps exactly as stored, and their inputs."""

    model_name: str
    module: torch.nn.Module
    images: Tensor
    """Preprocessed model inputs ``[B, 3, H, W]``."""
    maps: dict[str, np.ndarray]
    """``{method: float32 [B, H, W]}`` as stored (float16-rounded)."""
    targets: Sequence[int]
    image_ids: Sequence[str]
    gt_masks: Sequence[np.ndarray | None]
    """Ground-truth object mask per image in model-input geometry, None when it has none."""
    usable: np.ndarray
    """bool ``[B]``: images whose outputs are finite and that have at least one finite map."""
    settings: MetricsConfig
    seed: int
    amp_dtype: torch.dtype | None
    road_methods: frozenset[str]
    """Methods whose explainer lets ROAD score its maps."""
    mapped: dict[str, np.ndarray] | None = None
    """``{method: bool [B]}``: the images each method has a finite map of (None: every usable image)."""

    def scored(self, method: str) -> np.ndarray:
        """bool ``[B]``: the images whose ``method`` map is scored (one method's broken map is not its siblings')."""
        if self.mapped is None:
            return self.usable
        return self.usable & self.mapped[method]


class Metric(ABC):
    """A family of values computed together from a batch's maps."""

    name: str = ""
    category: str = ""
    """agreement | localization | faithfulness | ..."""
    table: str = "scores"
    scores: tuple[Score, ...] = ()

    def enabled(self, settings: MetricsConfig) -> bool:
        """Whether the run's settings ask for this metric (default: always)."""
        return True

    @abstractmethod
    def rows(self, batch: ScoredBatch) -> dict[str, list[dict[str, Any]]]:
        """Rows by table (:attr:`table`, and ``errors`` for items the metric could not score)."""
