"""Batched LIME reproduces stock lime_image: same segments, same perturbations, same explanation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lime import lime_image
from scipy import ndimage
from torch import nn

from xai_audit.tasks.compute.batch_sizes import CPU_BATCH_SIZES
from xai_audit.tasks.core.errors import ConfigError
from xai_audit.tasks.data.models import PixelModel
from xai_audit.tasks.explain.lime import (
    LimeResult,
    SegmentationCache,
    default_objective,
    explain_lime,
    hidden_image,
    lime_search,
    neighborhood_probabilities,
    perturbation_matrix,
    segment,
)

SIZE = 128  # lime's quickshift defaults find only a handful of superpixels in smaller images


def make_image(seed: int) -> np.ndarray:
    """Smoothed colour noise: lime's default quickshift cuts it into ~10-30 superpixels."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).random((SIZE, SIZE, 3)), (2, 2, 0))
    field = (field - field.min()) / (field.max() - field.min())
    return (field * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 5, padding=2),
        nn.ReLU(),
        nn.AvgPool2d(4),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(256, 5),
    ).eval()


def stock_classifier(model: nn.Module, seen: list | None = None):
    """The classifier_fn stock LIME calls: uint8 [N, H, W, 3] -> softmax probabilities."""

    def classify(batch: np.ndarray) -> np.ndarray:
        if seen is not None:
            seen.append(batch.copy())
        with torch.no_grad():
            pixels = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
            return torch.softmax(model(pixels), dim=-1).numpy()

    return classify


def run_stock(model, image, target, *, seed, num_samples, hide_color=None, seen=None):
    """Stock LimeImageExplainer called the standard way; returns its explanation and the matrix it drew."""
    explainer = lime_image.LimeImageExplainer(random_state=seed)
    drawn = {}
    data_labels = explainer.data_labels

    def recording_data_labels(*args, **kwargs):
        drawn["data"], drawn["labels"] = data_labels(*args, **kwargs)
        return drawn["data"], drawn["labels"]

    explainer.data_labels = recording_data_labels
    explanation = explainer.explain_instance(
        image,
        stock_classifier(model, seen),
        labels=(target,),
        top_labels=None,
        hide_color=hide_color,
        num_samples=num_samples,
        batch_size=50,
    )
    return explanation, drawn["data"]


def stock_weights(explanation, target: int, n_segments: int) -> np.ndarray:
    weights = np.zeros(n_segments)
    for feature, weight in explanation.local_exp[target]:
        weights[feature] = weight
    return weights


def test_default_segmentation_equals_stock_lime(model):
    for seed in (0, 1):
        image = make_image(seed)
        explanation, _ = run_stock(model, image, 0, seed=seed, num_samples=10)
        ours = segment(image)
        assert ours.dtype == np.int32
        assert np.array_equal(ours, explanation.segments)
        assert 8 <= ours.max() + 1 <= 60


@pytest.mark.parametrize("hide_color", [None, 0])
def test_perturbations_equal_the_ones_stock_lime_applies(model, hide_color):
    image, seed, num_samples = make_image(2), 7, 120
    seen: list[np.ndarray] = []
    explanation, stock_data = run_stock(
        model, image, 1, seed=seed, num_samples=num_samples, hide_color=hide_color, seen=seen
    )
    segments = segment(image)
    n_segments = segments.max() + 1
    ours = perturbation_matrix(n_segments, num_samples, seed)
    assert np.array_equal(ours, stock_data)

    # Independently of what data_labels returned: which superpixels did each image stock
    # LIME classified actually show? A superpixel is on when all its pixels are the original.
    stock_images = np.concatenate(seen)
    applied = np.stack(
        [
            [np.array_equal(sample[segments == s], image[segments == s]) for s in range(n_segments)]
            for sample in stock_images
        ]
    )
    assert np.array_equal(applied, ours.astype(bool))

    # And our batched tensor gather builds the very same images.
    ours_seen: list[torch.Tensor] = []

    def recording_model(batch: torch.Tensor) -> torch.Tensor:
        ours_seen.append(batch.clone())
        return model(batch)

    explain_lime(
        recording_model, [image], [1], num_samples=num_samples, seed=seed, hide_color=hide_color, batch_size=32
    )
    built = torch.cat(ours_seen).permute(0, 2, 3, 1).mul(255).round().to(torch.uint8).numpy()
    assert np.array_equal(built, stock_images)


def test_explanations_agree_with_stock_lime(model):
    jaccards = []
    for seed in (3, 4, 5):
        image = make_image(seed)
        with torch.no_grad():
            target = int(model(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255).argmax())
        explanation, _ = run_stock(model, image, target, seed=seed, num_samples=150)
        ours = explain_lime(model, [image], [target], num_samples=150, seed=seed, batch_size=64)[0]
        expected = stock_weights(explanation, target, len(ours.weights))
        assert np.allclose(ours.weights, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
        assert ours.intercept == pytest.approx(explanation.intercept[target], rel=1e-4)
        _, stock_mask = explanation.get_image_and_mask(target, positive_only=True, num_features=5)
        ours_top = set(np.unique(explanation.segments[ours.top_mask(5)]))
        stock_top = set(np.unique(explanation.segments[stock_mask.astype(bool)]))
        assert len(stock_top) == 5
        jaccards.append(len(ours_top & stock_top) / len(ours_top | stock_top))
    assert np.mean(jaccards) >= 0.8


def test_saliency_map_is_each_superpixels_weight(model):
    result = explain_lime(model, [make_image(6)], [2], num_samples=60, seed=0)[0]
    saliency = result.saliency_map
    assert saliency.shape == (SIZE, SIZE) and saliency.dtype == np.float32
    for segment_id in range(len(result.weights)):
        inside = saliency[result.segments == segment_id]
        assert np.all(inside == result.weights[segment_id])


def test_top_mask_holds_the_k_best_positive_superpixels():
    segments = np.repeat(np.arange(6, dtype=np.int32), 4).reshape(4, 6)
    weights = np.array([0.5, -2.0, 0.1, 0.9, 0.0, 0.3], dtype=np.float32)
    result = LimeResult(segments=segments, weights=weights, intercept=0.0, score=1.0, local_pred=0.5, target=0)
    assert np.array_equal(result.top_mask(2), np.isin(segments, [3, 0]))
    assert np.array_equal(result.top_mask(10), np.isin(segments, [3, 0, 5, 2]))


def test_other_segmentations_take_their_parameters_and_number_from_zero():
    image = make_image(7)
    coarse, fine = segment(image, "slic", n_segments=10), segment(image, "slic", n_segments=80)
    assert coarse.min() == 0 and np.array_equal(np.unique(coarse), np.arange(coarse.max() + 1))
    assert fine.max() > coarse.max()
    small, large = segment(image, "felzenszwalb", scale=10), segment(image, "felzenszwalb", scale=300)
    assert small.max() > large.max()


def test_unknown_segmentation_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="n_segments"):
        segment(make_image(0), "slic", n_segment=10)
    with pytest.raises(ConfigError, match="felzenszwalb"):
        segment(make_image(0), "watershed")


def test_segmentation_cache_computes_each_key_once():
    cache, image = SegmentationCache(), make_image(8)
    first = cache.segments(image, "slic", n_segments=20)
    again = cache.segments(image.copy(), "slic", n_segments=20)
    cache.segments(image, "slic", n_segments=30)
    assert again is first and (cache.hits, cache.misses) == (1, 2)


def test_bf16_autocast_keeps_the_top_superpixels(model):
    image = make_image(9)
    full = explain_lime(model, [image], [0], num_samples=150, seed=1)[0]
    mixed = explain_lime(model, [image], [0], num_samples=150, seed=1, amp_dtype=torch.bfloat16)[0]
    top_full, top_mixed = set(full.top_segments(5)), set(mixed.top_segments(5))
    assert len(top_full) == 5
    assert len(top_full & top_mixed) / len(top_full | top_mixed) >= 0.6


def test_search_scores_every_trial_and_picks_the_lowest_objective(model):
    grid = [
        {"segmentation": "quickshift", "num_samples": 60},
        {"segmentation": "slic", "n_segments": 12, "num_samples": 60},
        {"segmentation": "felzenszwalb", "scale": 200, "num_samples": 80},
    ]
    cache = SegmentationCache()
    search = lime_search(model, make_image(10), 3, grid, steps=8, batch_size=64, cache=cache)
    assert [trial.params for trial in search.trials] == grid
    for trial in search.trials:
        assert trial.objective == pytest.approx(default_objective(trial.components))
        assert 0.0 <= trial.components["deletion_auc"] <= 1.0
        assert 0.0 <= trial.components["top_k_jaccard"] <= 1.0
        assert trial.seconds > 0
    assert search.best.objective == min(trial.objective for trial in search.trials)
    assert cache.misses == 3  # both seeds of a trial share one segmentation


def test_search_rejects_a_parameter_the_algorithm_lacks(model):
    with pytest.raises(ConfigError, match=r"grid\.1\.kernel"):
        lime_search(model, make_image(0), 0, [{"num_samples": 10}, {"segmentation": "slic", "kernel": 3}])


def test_a_pixel_model_is_normalised_once_per_image_with_the_same_probabilities():
    """PixelModel's normalisation moves in front of the perturbation (it is per pixel): same inputs, same outputs."""
    torch.manual_seed(5)
    network = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 4),
    )
    network[1].running_mean.uniform_(-0.3, 0.3)
    network[1].running_var.uniform_(0.5, 2.0)
    network.eval()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    normalise = PixelModel(network, mean, std).normalise
    image = make_image(6)
    segments = segment(image)
    hidden = hidden_image(image, segments)
    data = perturbation_matrix(int(segments.max()) + 1, 40, 0)
    network_inputs: list[torch.Tensor] = []

    def plain_model(pixels: torch.Tensor) -> torch.Tensor:  # not a module: nothing folded, normalised per batch
        network_inputs.append(normalise(pixels))
        with torch.no_grad():
            return network(network_inputs[-1])

    expected = neighborhood_probabilities(plain_model, image, hidden, segments, data, batch_size=16)
    ours = neighborhood_probabilities(PixelModel(network, mean, std), image, hidden, segments, data, batch_size=16)
    assert np.abs(ours - expected).max() < 1e-6
    assert len(network_inputs) == 3  # 40 samples in batches of 16


@pytest.mark.parametrize(("amp_dtype", "precision"), [(None, "fp32"), (torch.bfloat16, "mixed")])
def test_default_batch_on_cpu_is_cache_sized_for_the_precision(model, amp_dtype, precision):
    sizes: list[int] = []

    def recording_model(batch: torch.Tensor) -> torch.Tensor:
        sizes.append(batch.shape[0])
        return model(batch)

    explain_lime(recording_model, [make_image(7)], [0], num_samples=70, seed=0, amp_dtype=amp_dtype)
    size = CPU_BATCH_SIZES[precision]
    assert sizes == [size] * (70 // size) + [70 % size]


def test_nonfinite_model_outputs_stop_lime_before_the_fit(model):
    from xai_audit.tasks.core.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match="not finite"):
        explain_lime(lambda batch: model(batch) * float("nan"), [make_image(8)], [0], num_samples=20, seed=0)
