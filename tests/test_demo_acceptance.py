"""Acceptance on the trained demo model: explanations point at the shapes it classifies, and
``xai-audit run`` with no config runs the whole demo audit from the package alone.

The model classifies the shape, so its evidence lies on the shape: Grad-CAM at the demo
config's CAM layer must win the pointing game, and a pure-noise map must score clearly worse
than Grad-CAM on localization and deletion. Batched LIME must pick the same top superpixels as stock ``lime_image``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.margins import assert_at_least
from xai_audit.tasks.core.config import load_config, parse_config
from xai_audit.tasks.data.image_sets import iter_image_set, record_row
from xai_audit.tasks.data.images import load_rgb
from xai_audit.tasks.data.loaded_models import using_model
from xai_audit.tasks.explain.cams import forward_with_cams
from xai_audit.tasks.explain.stage import ground_truth_mask
from xai_audit.tasks.metrics.maps import deletion_insertion, energy_in_gt, pointing_hit, scaled_tolerance

pytestmark = [pytest.mark.slow, pytest.mark.demo_model]


@pytest.fixture(scope="module")
def demo():
    """The demo model and 50 held-out world images with their object masks."""
    config = parse_config({"images": {"kind": "world", "split": "val", "limit": 50}})
    records = [record_row(item) for item in iter_image_set(config)]
    with using_model(config, config.models[0]) as model:
        images = [load_rgb(record["path"]) for record in records]
        pixels = torch.stack([model.preprocess(image) for image in images])
        masks = np.stack([ground_truth_mask(model, record, image.size) for record, image in zip(records, images)])
        labels = [model.class_names.index(record["label_name"]) for record in records]
        yield model, pixels, masks, labels, images


def test_demo_model_classifies_the_held_out_images(demo):
    model, pixels, _, labels, _ = demo
    with torch.no_grad():
        predicted = model.module(pixels).argmax(dim=-1).tolist()
    assert_at_least("accuracy on 50 held-out images", np.mean(np.array(predicted) == np.array(labels)), 0.95)


@pytest.fixture(scope="module")
def gradcam(demo):
    """Grad-CAM at the layer the shipped demo config names (layer3: 8x8 maps at 128 px)."""
    model, pixels, masks, labels, _ = demo
    cam_layer = load_config(Path(__file__).parents[1] / "configs" / "demo.yaml").models[0].cam_layer
    _, maps = forward_with_cams(model.module, model.module.get_submodule(cam_layer), pixels, labels, ["gradcam"])
    assert maps["gradcam"].shape[1:] == masks.shape[1:]
    return maps["gradcam"]


def test_gradcam_wins_the_pointing_game(demo, gradcam):
    _, _, masks, _, _ = demo
    tolerance = scaled_tolerance(masks.shape[-1])
    hits = np.mean([pointing_hit(m, mask, tolerance) for m, mask in zip(gradcam, masks)])
    assert_at_least("Grad-CAM pointing accuracy (50 images)", hits, 0.8)


def test_gradcam_beats_a_noise_map_on_localization_and_deletion(demo, gradcam):
    model, pixels, masks, labels, _ = demo
    tolerance = scaled_tolerance(masks.shape[-1])
    hits = [pointing_hit(m, mask, tolerance) for m, mask in zip(gradcam, masks)]
    noise = np.random.default_rng(0).random(gradcam.shape).astype(np.float32)
    noise_hits = [pointing_hit(m, mask, tolerance) for m, mask in zip(noise, masks)]
    energy = np.mean([energy_in_gt(m, mask) for m, mask in zip(gradcam, masks)])
    noise_energy = np.mean([energy_in_gt(m, mask) for m, mask in zip(noise, masks)])
    assert_at_least("pointing: Grad-CAM minus noise", np.mean(hits) - np.mean(noise_hits), 0.3)
    assert_at_least("energy in the mask: Grad-CAM / noise", energy / noise_energy, 1.5)

    deletion, _ = deletion_insertion(model.module, pixels, gradcam, labels, steps=10, baseline="mean")
    noise_deletion, _ = deletion_insertion(model.module, pixels, noise, labels, steps=10, baseline="mean")
    assert_at_least("deletion AUC: noise minus Grad-CAM", noise_deletion.mean() - deletion.mean(), 0.05)


def test_batched_lime_agrees_with_stock_lime_on_world_images(demo):
    from lime import lime_image

    from xai_audit.tasks.explain.lime import explain_lime, segment

    model, pixels, _, labels, images = demo
    model_fn = model.pixel_model
    jaccards = []
    for image, label in list(zip(images, labels))[:5]:
        array = np.asarray(image)

        def classify(batch: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return torch.softmax(model_fn(torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255), -1).numpy()

        segments = segment(array, "quickshift")
        stock = lime_image.LimeImageExplainer(random_state=0).explain_instance(
            array,
            classify,
            labels=(label,),
            top_labels=None,
            num_samples=300,
            batch_size=100,
            segmentation_fn=lambda _, segments=segments: segments,
        )
        stock_top = {
            feature for feature, weight in sorted(stock.local_exp[label], key=lambda fw: -fw[1])[:5] if weight > 0
        }
        ours = explain_lime(model_fn, [array], [label], num_samples=300, seed=0)[0]
        our_top = set(ours.top_segments(5).tolist())
        # Where every perturbation leaves the probability unchanged (two of the fp32-trained demo
        # model's first five images), both give no positive segment: identical answers, Jaccard 1.
        union = stock_top | our_top
        jaccards.append(len(stock_top & our_top) / len(union) if union else 1.0)
    assert_at_least("top-5 superpixel Jaccard, batched vs stock LIME", np.mean(jaccards), 0.8)
