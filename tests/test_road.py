"""ROAD through grad-cam: a map on the evidence the model uses outscores a map on what it ignores."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from xai_audit.tasks.metrics.road import road_scores


class LeftHalfBrightness(nn.Module):
    """Class 0's logit is 8x the mean of the image's left half; class 1's is constant 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = x[:, :, :, : x.shape[-1] // 2].mean(dim=(1, 2, 3))
        return torch.stack([8 * left, torch.full_like(left, 2.0)], dim=1)


def test_the_map_on_the_models_evidence_scores_higher_than_its_mirror():
    generator = torch.Generator().manual_seed(0)
    images = torch.zeros(3, 3, 32, 32)
    images[:, :, :, :16] = 0.8 + 0.1 * torch.rand(3, 3, 32, 16, generator=generator)
    ramp = np.linspace(0, 0.01, 32 * 32, dtype=np.float32).reshape(32, 32)  # no ties at the percentile
    evidence = np.zeros((32, 32), np.float32)
    evidence[:, :16] = 1.0
    right_maps = np.stack([evidence + ramp] * 3)
    wrong_maps = np.stack([evidence[:, ::-1] + ramp] * 3)

    right = road_scores(LeftHalfBrightness(), images, right_maps, [0, 0, 0], percentiles=[50])
    wrong = road_scores(LeftHalfBrightness(), images, wrong_maps, [0, 0, 0], percentiles=[50])

    assert right.shape == (3,) and np.all(np.isfinite(right))
    # Removing the left half (imputed from the dark right half) collapses class 0, removing the right half does not.
    assert np.all(right > 0.2) and np.all(wrong < -0.2)
    np.testing.assert_allclose(right, -wrong, atol=0.05)
