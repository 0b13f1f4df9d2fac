"""Metrics against ground truth we construct: known masks, hand-computed curves and ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from xai_audit.tasks.core.errors import ConfigError, ItemError
from xai_audit.tasks.metrics.maps import (
    NonFiniteMapError,
    agreement_rows,
    binarize,
    com_distance,
    deletion_insertion,
    deletion_insertion_curves,
    energy_in_gt,
    iou_gt,
    map_iou,
    pointing_hit,
    scaled_tolerance,
    spearman,
    trapezoid_auc,
)


@pytest.fixture
def smooth_map() -> np.ndarray:
    return np.random.default_rng(0).random((32, 40))


# --- agreement -------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["top_q", "otsu"])
def test_iou_of_a_map_with_itself_is_one(smooth_map, rule):
    assert map_iou(smooth_map, smooth_map, rule=rule) == 1.0


@pytest.mark.parametrize("q", [0.1, 0.2, 0.5])
def test_iou_of_a_map_with_its_complement_is_zero(smooth_map, q):
    assert map_iou(smooth_map, 1.0 - smooth_map, rule="top_q", q=q) == 0.0


def test_top_q_keeps_exactly_that_share_of_pixels(smooth_map):
    mask = binarize(smooth_map, "top_q", q=0.2)
    assert mask.sum() == round(0.2 * smooth_map.size)
    assert smooth_map[mask].min() > smooth_map[~mask].max()


def test_otsu_separates_a_bimodal_map():
    values = np.zeros((20, 20))
    values[5:10, 5:10] = 1.0
    values += np.random.default_rng(1).normal(0, 0.01, values.shape)
    expected = np.zeros((20, 20), dtype=bool)
    expected[5:10, 5:10] = True
    assert np.array_equal(binarize(values, "otsu"), expected)


def test_unknown_rule_names_the_valid_ones(smooth_map):
    with pytest.raises(ConfigError, match="top_q, otsu"):
        binarize(smooth_map, "median")


def test_spearman_of_a_strictly_monotone_transform_is_one(smooth_map):
    assert spearman(smooth_map, np.exp(3 * smooth_map) - 7) == pytest.approx(1.0)


def test_spearman_with_the_negation_is_minus_one(smooth_map):
    assert spearman(smooth_map, -smooth_map) == pytest.approx(-1.0)


def test_spearman_matches_hand_computed_values():
    # No ties: rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 60.
    assert spearman(np.array([[1.0, 2.0, 3.0, 4.0]]), np.array([[1.0, 3.0, 2.0, 4.0]])) == pytest.approx(0.8)
    # Ties get average ranks: b's ranks are 1, 2, 3.5, 5, 3.5, so rho = 8 / sqrt(10 * 9.5).
    a = np.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
    b = np.array([[5.0, 6.0, 7.0, 8.0, 7.0]])
    assert spearman(a, b) == pytest.approx(8 / math.sqrt(95))


def test_spearman_of_a_constant_map_is_undefined(smooth_map):
    assert math.isnan(spearman(smooth_map, np.zeros_like(smooth_map)))


def test_com_distance_of_a_shifted_copy_is_shift_over_diagonal():
    values = np.zeros((60, 80))
    values[10:20, 15:22] = np.random.default_rng(2).random((10, 7))
    shifted = np.roll(values, (3, 4), axis=(0, 1))
    assert com_distance(values, shifted) == pytest.approx(5 / math.hypot(60, 80))
    assert com_distance(values, values) == 0.0


def test_agreement_rows_cover_every_pair_once_in_name_order(smooth_map):
    maps = {"scorecam": smooth_map, "gradcam": smooth_map**2, "lime": 1 - smooth_map}
    rows = agreement_rows(maps, rule="top_q", q=0.2)
    assert [(r["method_a"], r["method_b"]) for r in rows] == [
        ("gradcam", "lime"),
        ("gradcam", "scorecam"),
        ("lime", "scorecam"),
    ]
    gradcam_scorecam = rows[1]
    assert gradcam_scorecam["iou"] == 1.0 and gradcam_scorecam["spearman"] == pytest.approx(1.0)
    assert rows[0]["iou"] == 0.0 and rows[0]["spearman"] == pytest.approx(-1.0)
    assert all(set(r) >= {"method_a", "method_b", "iou", "spearman", "com_distance", "rule"} for r in rows)
    assert all(r["rule"] == "top_q" for r in rows)


# --- localization ----------------------------------------------------------------------------


@pytest.fixture
def square_mask() -> np.ndarray:
    mask = np.zeros((64, 64), dtype=bool)
    mask[20:30, 20:30] = True
    return mask


def test_pointing_hit_inside_the_mask(square_mask):
    values = np.zeros((64, 64))
    values[25, 25] = 1.0
    assert pointing_hit(values, square_mask, tolerance_px=0)


def test_pointing_tolerance_is_inclusive_at_its_edge(square_mask):
    values = np.zeros((64, 64))
    values[25, 45] = 1.0  # 16 px right of the mask's last column (29)
    assert pointing_hit(values, square_mask, tolerance_px=16)
    assert not pointing_hit(values, square_mask, tolerance_px=15.9)


def test_pointing_counts_any_pixel_of_a_maximal_plateau(square_mask):
    """Zhang et al. 2016 and Quantus' PointingGame: a hit when any maximal pixel is within tolerance."""
    values = np.zeros((64, 64))
    values[0:41, 0:13] = 1.0  # a superpixel whose nearest pixel, (20..29, 12), lies 8 px left of the mask
    assert pointing_hit(values, square_mask, tolerance_px=8)
    assert not pointing_hit(values, square_mask, tolerance_px=7.9)
    values[60, 60] = 1.0  # a second, far maximum does not undo the hit
    assert pointing_hit(values, square_mask, tolerance_px=8)
    values[0:41, 0:13] = 0.999  # below the maximum: only (60, 60) points now, 31 px away
    assert not pointing_hit(values, square_mask, tolerance_px=30.9)
    assert pointing_hit(values, square_mask, tolerance_px=43.9)  # (29, 29) is 31·√2 ≈ 43.8 px away


def test_scaled_tolerance_is_15_px_at_224():
    assert scaled_tolerance(224) == 15
    assert scaled_tolerance(64) == pytest.approx(15 * 64 / 224)


def test_energy_in_gt_is_the_share_of_mass_inside(square_mask):
    assert energy_in_gt(np.ones((64, 64)), square_mask) == pytest.approx(100 / 4096)
    values = np.zeros((64, 64))
    values[20:30, 20:25] = 3.0
    values[0:5, 0:10] = 1.0
    assert energy_in_gt(values, square_mask) == pytest.approx(150 / 200)
    values[40:, 40:] = -5.0  # negative evidence is not mass
    assert energy_in_gt(values, square_mask) == pytest.approx(150 / 200)


def test_iou_gt_of_the_mask_itself_is_one(square_mask):
    values = square_mask.astype(float) + np.random.default_rng(3).random((64, 64)) * 0.1
    assert iou_gt(values, square_mask, rule="top_q", q=100 / 4096) == 1.0
    assert iou_gt(values, square_mask, rule="otsu") == 1.0


def test_empty_gt_mask_is_an_item_error():
    with pytest.raises(ItemError):
        pointing_hit(np.ones((8, 8)), np.zeros((8, 8), dtype=bool), 1)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_maps_raise_an_item_error(smooth_map, square_mask, bad):
    broken = smooth_map.copy()
    broken[3, 4] = bad
    for call in (
        lambda: binarize(broken),
        lambda: spearman(broken, smooth_map),
        lambda: com_distance(smooth_map, broken),
    ):
        with pytest.raises(NonFiniteMapError):
            call()
    assert issubclass(NonFiniteMapError, ItemError)


# --- faithfulness ----------------------------------------------------------------------------


class RegionModel(nn.Module):
    """Two logits: ``gain * mean(channel 0 over a region)`` and 0; nothing else matters."""

    def __init__(self, rows: slice, cols: slice, gain: float = 4.0) -> None:
        super().__init__()
        self.rows, self.cols, self.gain = rows, cols, gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = self.gain * x[:, 0, self.rows, self.cols].mean(dim=(1, 2))
        return torch.stack([evidence, torch.zeros_like(evidence)], dim=1)


@pytest.fixture
def region_case():
    rows, cols = slice(8, 16), slice(4, 14)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=generator) * 0.3
    images[:, 0, rows, cols] = 2.0
    region = np.zeros((32, 32))
    region[rows, cols] = 1.0
    ramp = np.linspace(0, 0.5, 32 * 32).reshape(32, 32)
    good = np.stack([region + 0.1 * ramp] * 3)
    elsewhere = np.stack([(1 - region) + 0.1 * ramp] * 3)
    noise = np.random.default_rng(4).random((3, 32, 32))
    return RegionModel(rows, cols), images, good, elsewhere, noise


@pytest.mark.parametrize("baseline", ["mean", "blur"])
def test_a_map_on_the_evidence_deletes_faster_and_inserts_faster(region_case, baseline):
    model, images, good, elsewhere, noise = region_case
    targets = [0, 0, 0]
    scores = {
        name: deletion_insertion(model, images, maps, targets, steps=16, baseline=baseline, batch_size=32)
        for name, maps in [("good", good), ("elsewhere", elsewhere), ("noise", noise)]
    }
    deletion = {name: d for name, (d, _) in scores.items()}
    insertion = {name: i for name, (_, i) in scores.items()}
    assert np.all(deletion["good"] < deletion["noise"]) and np.all(deletion["noise"] < deletion["elsewhere"])
    assert np.all(insertion["good"] > insertion["noise"]) and np.all(insertion["noise"] > insertion["elsewhere"])


def test_curve_matches_a_hand_computed_example():
    class SumModel(nn.Module):
        def forward(self, x):
            total = x[:, 0].sum(dim=(1, 2))
            return torch.stack([total, torch.zeros_like(total)], dim=1)

    image = torch.zeros(1, 3, 2, 2)
    image[0, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    saliency = image[0, 0].numpy()[None]
    deletion, insertion, fractions = deletion_insertion_curves(
        SumModel(), image, saliency, [0], steps=4, baseline="mean", batch_size=3
    )
    sigmoid = lambda s: 1 / (1 + math.exp(-s))  # noqa: E731
    assert np.allclose(fractions, [0, 0.25, 0.5, 0.75, 1])
    assert np.allclose(deletion[0], [sigmoid(s) for s in (10, 6, 3, 1, 0)])
    assert np.allclose(insertion[0], [sigmoid(s) for s in (0, 4, 7, 9, 10)])
    expected = 0.25 * (sigmoid(10) / 2 + sigmoid(6) + sigmoid(3) + sigmoid(1) + sigmoid(0) / 2)
    deletion_auc, _ = deletion_insertion(SumModel(), image, saliency, [0], steps=4, baseline="mean")
    assert deletion_auc[0] == pytest.approx(expected)


def test_auc_of_a_constant_curve_is_that_constant():
    assert trapezoid_auc(np.full(21, 0.37)) == pytest.approx(0.37)

    class Constant(nn.Module):
        def forward(self, x):
            return torch.tensor([[0.3, 1.2, -0.5]]).expand(x.shape[0], 3)

    probability = torch.softmax(torch.tensor([0.3, 1.2, -0.5]), 0)[1].item()
    deletion, insertion = deletion_insertion(
        Constant(), torch.randn(2, 3, 16, 16), np.random.default_rng(5).random((2, 16, 16)), [1, 1], steps=7
    )
    assert np.allclose(deletion, probability) and np.allclose(insertion, probability)


def test_batched_equals_one_image_at_a_time(region_case):
    model, images, good, _, noise = region_case
    maps = np.stack([good[0], noise[1], noise[2]])
    together = deletion_insertion(model, images, maps, [0, 1, 0], steps=10, batch_size=7)
    for index in range(3):
        alone = deletion_insertion(
            model, images[index : index + 1], maps[index : index + 1], [[0, 1, 0][index]], steps=10, batch_size=1000
        )
        assert together[0][index] == pytest.approx(alone[0][0], abs=1e-6)
        assert together[1][index] == pytest.approx(alone[1][0], abs=1e-6)


def test_deletion_rejects_a_non_finite_map(region_case):
    model, images, good, _, _ = region_case
    broken = good.copy()
    broken[1, 0, 0] = math.nan
    with pytest.raises(NonFiniteMapError, match=r"maps\[1\]"):
        deletion_insertion(model, images, broken, [0, 0, 0])


def test_unknown_baseline_names_the_valid_ones(region_case):
    model, images, good, _, _ = region_case
    with pytest.raises(ConfigError, match="blur, mean"):
        deletion_insertion(model, images, good, [0, 0, 0], baseline="zeros")
