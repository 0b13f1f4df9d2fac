"""Adaptive LIME: rounds of lime's own perturbations until the top-k superpixels settle (S-LIME's idea).

Ground truth is constructed: an image of 16 uniform colour blocks (felzenszwalb cuts exactly
those), models whose output is a known function of which blocks are shown, and a model whose
output is deterministic noise in the mask (no explanation ever settles). The standard errors
are checked against an independent computation: ridge regression is ordinary least squares on
data augmented with ``sqrt(alpha) * I`` pseudo-rows (Hastie, Tibshirani & Friedman, *The
Elements of Statistical Learning*, exercise 3.12), solved here with ``numpy.linalg.lstsq`` on
the kernel-weighted rows, with lime_image's kernel and cosine distance as lime's source
defines them (``lime_image.LimeImageExplainer.__init__``: ``sqrt(exp(-d^2 / width^2))``;
``explain_instance``: cosine distance of each row to the first).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import cdist
from torch import nn

from xai_audit.storage.maps import decode_map
from xai_audit.tasks.core.config import ConfigErrors, parse_config
from xai_audit.tasks.data.models import PixelModel
from xai_audit.tasks.explain.base import ExplainContext
from xai_audit.tasks.explain.lime import (
    UNCERTAINTY_CAP,
    LimeExplainer,
    LimeResult,
    explain_lime,
    fit_explanation,
    perturbation_matrix,
    segment,
    uncertainty_row,
)
from xai_audit.tasks.explain.lime_convergence import AdaptiveSettings, ridge_standard_errors
from xai_audit.tasks.results.summary import lime_samples

BLOCK, GRID = 16, 4
SIDE = BLOCK * GRID
CAP, ROUND = 400, 50
RULE = AdaptiveSettings(round_size=ROUND, top_k=5, stable_rounds=2, z=1.0)
SEGMENTATION = {"sigma": 0}  # no smoothing: each uniform block is one superpixel
LIME = dict(
    segmentation="felzenszwalb",
    segmentation_params=SEGMENTATION,
    hide_color=0,
    num_samples=CAP,
    batch_size=ROUND,
    seed=3,
)


def block_image() -> np.ndarray:
    """16 uniform blocks of distinct, well-separated colours (each channel in [120, 255])."""
    colours = np.random.default_rng(0).permutation(np.linspace(120, 255, GRID * GRID * 3)).reshape(GRID, GRID, 3)
    return np.kron(colours, np.ones((BLOCK, BLOCK, 1))).astype(np.uint8)


def block_ids() -> np.ndarray:
    return np.kron(np.arange(GRID * GRID).reshape(GRID, GRID), np.ones((BLOCK, BLOCK), dtype=int))


class BlockModel(nn.Module):
    """Two classes; class 1's logit is ``gain * sum_k strength_k * (block k shown)`` (hidden blocks are black)."""

    def __init__(self, strengths: np.ndarray, gain: float = 1.0) -> None:
        super().__init__()
        masks = np.stack([block_ids() == k for k in range(GRID * GRID)]).astype(np.float32)
        self.register_buffer("masks", torch.from_numpy(masks / masks.sum(axis=(1, 2), keepdims=True)))
        self.register_buffer("strengths", torch.tensor(strengths, dtype=torch.float32))
        self.gain = gain

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        brightness = pixels.mean(dim=1)  # [N, H, W]
        shown = torch.einsum("nhw,khw->nk", brightness, self.masks) > 0.05
        logit = self.gain * (shown.float() * self.strengths).sum(dim=1)
        centred = logit - self.gain * float(self.strengths.sum()) / 2  # probabilities near 0.5: nearly linear
        return torch.stack([torch.zeros_like(centred), centred], 1)


class NoiseModel(nn.Module):
    """A logit that is deterministic noise in the mask: no superpixel matters, so no top-k ever settles."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("projection", torch.from_numpy(np.random.default_rng(1).normal(size=(3, SIDE, SIDE))))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        code = (pixels.double() * self.projection).sum(dim=(1, 2, 3))
        logit = 3.0 * torch.sin(997.0 * code)
        return torch.stack([torch.zeros_like(logit), logit], 1).float()


EASY = np.array([1.0, 0.85, 0.7, 0.55, 0.4] + [0.0] * 11)  # blocks 0-4 carry the class, in that order


def test_the_constructed_image_segments_into_its_blocks():
    segments = segment(block_image(), "felzenszwalb", **SEGMENTATION)
    assert segments.max() + 1 == GRID * GRID
    for k in range(GRID * GRID):
        assert len(np.unique(segments[block_ids() == k])) == 1


def test_same_seed_gives_the_same_map_and_samples_twice():
    first, second = (explain_lime(BlockModel(EASY), [block_image()], [1], adaptive=RULE, **LIME)[0] for _ in range(2))
    assert np.array_equal(first.weights, second.weights)
    assert np.array_equal(first.std_errors, second.std_errors)
    assert first.samples_used == second.samples_used and first.rounds == second.rounds


def test_stops_early_on_an_easy_image_with_the_planted_top_five():
    (result,) = explain_lime(BlockModel(EASY), [block_image()], [1], adaptive=RULE, **LIME)
    segments = segment(block_image(), "felzenszwalb", **SEGMENTATION)
    planted = {int(segments[block_ids() == k][0]) for k in range(5)}
    assert result.stopped_early and result.samples_used <= 2 * ROUND < CAP  # the first two refits agree
    assert set(result.top_segments(5)) == planted


def test_uses_the_cap_on_a_model_whose_output_is_noise_in_the_mask():
    (result,) = explain_lime(NoiseModel(), [block_image()], [1], adaptive=RULE, **LIME)
    assert not result.stopped_early
    assert result.samples_used == CAP and result.rounds == CAP // ROUND


def test_a_run_that_reaches_the_cap_is_the_fixed_n_explanation():
    (adaptive,) = explain_lime(NoiseModel(), [block_image()], [1], adaptive=RULE, **LIME)
    (fixed,) = explain_lime(NoiseModel(), [block_image()], [1], **LIME)
    assert fixed.samples_used == CAP and fixed.rounds == 1
    assert np.array_equal(adaptive.weights, fixed.weights)
    assert np.array_equal(adaptive.std_errors, fixed.std_errors)


def test_rounds_end_on_whole_forward_batches():
    sizes: list[int] = []
    model = NoiseModel()

    def recording(batch: torch.Tensor) -> torch.Tensor:
        sizes.append(batch.shape[0])
        return model(batch)

    explain_lime(
        recording, [block_image()], [1], adaptive=AdaptiveSettings(round_size=30), **{**LIME, "batch_size": 16}
    )
    assert sizes == [16] * (CAP // 16)  # rounds of 32 samples (not 30): the fixed path's batches exactly


def augmented_least_squares(data, labels, weights, alpha=1.0):
    """Ridge as OLS on ``[sqrt(w) [1, X]; [0, sqrt(alpha) I]]``: coefficients and their standard errors."""
    n, p = data.shape
    design = np.vstack(
        [
            np.sqrt(weights)[:, None] * np.hstack([np.ones((n, 1)), data]),
            np.hstack([np.zeros((p, 1)), np.sqrt(alpha) * np.eye(p)]),
        ]
    )
    target = np.concatenate([np.sqrt(weights) * labels, np.zeros(p)])
    solution, *_ = np.linalg.lstsq(design, target, rcond=None)
    residual_variance = np.sum((target - design @ solution) ** 2) / (len(target) - (p + 1))
    covariance = residual_variance * np.linalg.inv(design.T @ design)
    return solution[1:], np.sqrt(np.diag(covariance))[1:]


def test_stored_standard_errors_match_augmented_least_squares():
    segments = segment(block_image(), "felzenszwalb", **SEGMENTATION)
    data = perturbation_matrix(GRID * GRID, 300, 7)
    rng = np.random.default_rng(2)
    probability = np.clip(0.2 + data @ rng.uniform(0, 0.05, GRID * GRID) + rng.normal(0, 0.05, 300), 0, 1)
    probabilities = np.stack([1 - probability, probability], 1)
    result = fit_explanation(segments, data, probabilities, 1)
    distances = cdist(data, data[:1], metric="cosine").ravel()
    kernel = np.sqrt(np.exp(-(distances**2) / 0.25**2))
    coefficients, std_errors = augmented_least_squares(data.astype(float), probability, kernel)
    np.testing.assert_allclose(result.weights, coefficients, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.std_errors, std_errors, rtol=1e-4)
    assert result.samples_used == 300


def test_standard_errors_shrink_as_samples_grow():
    """More rows of the same noisy linear model: the closed-form standard errors fall roughly as 1/sqrt(n)."""
    rng = np.random.default_rng(4)
    data = rng.integers(0, 2, (4000, 10)).astype(float)
    labels = data @ np.linspace(0, 1, 10) + rng.normal(0, 0.5, 4000)
    weights = np.ones(4000)
    small, large = (
        ridge_standard_errors(
            data[:n], labels[:n], weights[:n], augmented_least_squares(data[:n], labels[:n], weights[:n])[0]
        )
        for n in (250, 4000)
    )
    np.testing.assert_allclose(small / large, 4.0, rtol=0.2)


def test_the_explainer_stores_samples_used_and_the_uncertainty_map():
    config = parse_config(
        {
            "explain": {
                "lime": {
                    "segmentation": "felzenszwalb",
                    "segmentation_params": SEGMENTATION,
                    "hide_color": [0, 0, 0],
                    "num_samples": CAP,
                    "batch_size": ROUND,
                    "adaptive": {"enabled": True, "round_size": ROUND},
                }
            }
        }
    )
    pixel_model = PixelModel(BlockModel(EASY), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # the model sees [0, 1] pixels
    images = pixel_model.normalise(torch.from_numpy(block_image()).permute(2, 0, 1)[None].float() / 255)
    context = ExplainContext(
        model=SimpleNamespace(pixel_model=pixel_model, name="m"),
        layer=nn.Identity(),
        settings=config.explain,
        seed=LIME["seed"],
        amp_dtype=None,
        image_ids=["blocks.png"],
    )
    explained = LimeExplainer().explain(context, images, [1], ["lime"])
    (row,) = explained.rows["lime_uncertainty"]
    (expected,) = explain_lime(BlockModel(EASY), [block_image()], [1], adaptive=RULE, **LIME)
    assert row["adaptive"] and row["stopped_early"] and row["num_samples"] == CAP
    assert row["samples_used"] == expected.samples_used < CAP
    np.testing.assert_allclose(row["std_errors"], expected.std_errors, rtol=1e-6)
    segments = segment(block_image(), "felzenszwalb", **SEGMENTATION)
    scale = np.abs(expected.weights).max()
    np.testing.assert_allclose(decode_map(row), expected.std_errors[segments] / scale, rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(explained.maps["lime"][0], expected.weights[segments] / scale, rtol=1e-6)


def test_a_bad_adaptive_option_names_its_field():
    with pytest.raises(ConfigErrors) as caught:
        parse_config({"explain": {"lime": {"adaptive": {"round_size": 0, "z": -1}}}})
    fields = dict(caught.value.problems)
    assert "explain.lime.adaptive.round_size" in fields and "explain.lime.adaptive.z" in fields


def test_the_summary_averages_samples_used_per_model():
    rows = pd.DataFrame(
        {
            "model": ["a", "a", "b"],
            "image_id": ["x", "y", "x"],
            "target": [0, 0, 0],
            "samples_used": [200, 400, 1000],
            "num_samples": [1000, 1000, 1000],
            "adaptive": [True, True, False],
            "stopped_early": [True, True, False],
            "std_errors": [[0.1, 0.3], [0.2, np.nan], [0.05]],
        }
    )
    summary = lime_samples(rows).set_index("model")
    assert summary.loc["a", "samples_used_mean"] == 300 and summary.loc["a", "samples_used_max"] == 400
    assert summary.loc["a", "stopped_early_share"] == 1.0 and summary.loc["b", "stopped_early_share"] == 0.0
    np.testing.assert_allclose(summary.loc["a", "std_error_mean"], (0.2 + 0.2) / 2)
    assert summary.loc["b", "maps"] == 1 and not summary.loc["b", "adaptive"]


def test_an_uncertainty_that_dwarfs_the_map_is_stored_capped_not_overflowed():
    """A near-flat map (largest weight 1e-6) with unit standard errors, and a fit on one sample
    (infinite errors): the per-pixel uncertainty is error / largest weight, capped at float16's largest."""
    segments = np.repeat(np.arange(4, dtype=np.int32), 4).reshape(4, 4)
    weights = np.array([1e-6, 0.0, -5e-7, 0.0], dtype=np.float32)
    std_errors = np.array([1e-7, 1.0, np.inf, np.nan], dtype=np.float32)
    result = LimeResult(segments, weights, 0.0, 0.0, 0.0, 0, std_errors=std_errors, samples_used=1)
    with np.errstate(over="raise"):  # the float16 cast would overflow without the cap
        row = uncertainty_row("m", "a.png", result, scale=1e-6)
    stored = decode_map(row)
    assert np.isfinite(stored).all()
    np.testing.assert_allclose(stored[:, 0], [0.1, UNCERTAINTY_CAP, UNCERTAINTY_CAP, 0.0], rtol=1e-3)
