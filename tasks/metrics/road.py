"""ROAD faithfulness (Rong et al., 2022) of CAM maps through grad-cam's own metric.

Deletion and insertion replace pixels by a blur or the mean, which draws edges the model can
read; ROAD fills removed pixels by noisy linear imputation from their neighbours instead.
grad-cam's ``ROADCombined`` averages ``(LeRF - MoRF) / 2`` of the target's softmax over
percentiles of removed pixels: higher means the map's top pixels matter more to the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def road_scores(
    module: nn.Module,
    inputs: torch.Tensor,
    maps: np.ndarray,
    targets: Sequence[int],
    percentiles: Sequence[int],
    seed: int = 0,
) -> np.ndarray:
    """float64 ``[N]``: grad-cam's ``ROADCombined`` score of each ``maps[i]`` for class ``targets[i]``.

    ``inputs`` are the model's preprocessed ``[N, 3, H, W]`` tensors, ``maps`` ``[N, H, W]`` at
    input resolution; the imputation runs on the CPU (a sparse solve per image and percentile).
    The imputation's noise comes from torch's global generator: each image is scored alone in a
    forked generator seeded with ``seed``, so its score does not depend on the batch it came in
    and the caller's random stream is left alone.
    """
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    metric = ROADCombined(percentiles=list(percentiles))
    maps = np.asarray(maps, dtype=np.float32)
    scores = np.empty(len(targets), dtype=np.float64)
    for index, target in enumerate(targets):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            scores[index] = metric(
                inputs[index : index + 1], maps[index : index + 1], [ClassifierOutputSoftmaxTarget(int(target))], module
            )[0]
    return scores
