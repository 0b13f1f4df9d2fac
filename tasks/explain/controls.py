"""Control explanations: maps that carry no information about the model.

A metric is worth reading only if it ranks real explanations above maps that know nothing of the
model. These three are that floor (Adebayo et al. 2018 use an edge detector the same way): a
seeded random map, a centred Gaussian, and the image's Sobel edge map. None of them looks at the
model or the target, so each fails model randomisation by construction, and a metric that ranks
one of them above a real method cannot tell good maps from bad on that data (the summary flags it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from skimage.color import rgb2gray
from skimage.filters import sobel
from torch import Tensor

from xai_audit.tasks.explain.base import ExplainContext, Explainer, Explanations

GAUSSIAN_SIGMA = 0.25
"""The centred Gaussian's standard deviation as a share of the image side."""


def image_seed(seed: int, image_id: str) -> int:
    """A seed of its own per run seed and image (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def random_map(height: int, width: int, seed: int) -> np.ndarray:
    """Uniform noise in [0, 1): every pixel ranked at random."""
    return np.random.default_rng(seed).random((height, width), dtype=np.float32)


def centred_gaussian(height: int, width: int, sigma: float = GAUSSIAN_SIGMA) -> np.ndarray:
    """An isotropic Gaussian on the image centre, peak 1, ``sigma`` a share of the shorter side."""
    rows = np.arange(height, dtype=np.float64) - (height - 1) / 2
    cols = np.arange(width, dtype=np.float64) - (width - 1) / 2
    squared = rows[:, None] ** 2 + cols[None, :] ** 2
    return np.exp(-squared / (2 * (sigma * min(height, width)) ** 2)).astype(np.float32)


def edge_map(pixels: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of the image's luminance (``pixels``: RGB ``[H, W, 3]`` in [0, 1]), scaled to a
    maximum of 1 (all zeros for a flat image)."""
    edges = sobel(rgb2gray(pixels))
    peak = edges.max()
    return (edges / peak if peak > 0 else edges).astype(np.float32)


class ControlFamily(Explainer):
    """Controls: a seeded random map, a centred Gaussian and a Sobel edge map; none of them reads the model."""

    methods = ("control_random", "control_gaussian", "control_edges")
    road = False
    control = True

    def explain(
        self, context: ExplainContext, images: Tensor, targets: Sequence[int], methods: Sequence[str]
    ) -> Explanations:
        count, _, height, width = images.shape
        maps: dict[str, np.ndarray] = {}
        if "control_random" in methods:
            maps["control_random"] = np.stack(
                [random_map(height, width, image_seed(context.seed, image_id)) for image_id in context.image_ids]
            )
        if "control_gaussian" in methods:
            maps["control_gaussian"] = np.repeat(centred_gaussian(height, width)[None], count, axis=0)
        if "control_edges" in methods:
            mean = torch.tensor(context.model.mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(context.model.std, dtype=torch.float32).view(1, -1, 1, 1)
            pixels = (images.detach().float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
            maps["control_edges"] = np.stack([edge_map(image) for image in pixels])
        return Explanations(maps)
