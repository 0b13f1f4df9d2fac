"""The explain stage on world images: every table written, metrics recomputable from stored maps."""

from __future__ import annotations

import numpy as np
import pytest

from xai_audit.flows.audit import run_audit
from xai_audit.storage.maps import decode_map
from xai_audit.storage.parquet import ResultsStore
from xai_audit.tasks.core.config import parse_config
from xai_audit.tasks.metrics.maps import agreement_rows, deletion_insertion, localization_row, scaled_tolerance
from xai_audit.tasks.metrics.road import road_scores

METHODS = ["gradcam", "gradcam++", "eigencam", "lime"]


@pytest.fixture(scope="module")
def explained(prefect_harness, tmp_path_factory):
    results = str(tmp_path_factory.mktemp("results"))
    config = parse_config(
        {
            "name": "explain-world",
            "world": {"n_train": 1, "n_val": 6},
            "models": [
                {
                    "name": "tiny",
                    "source": "python",
                    "callable": "tests.fixtures.tiny_models:tiny_resnet",
                    "num_classes": 3,
                    "preprocess": {"resize": 128, "crop": 128},
                }
            ],
            "images": {"kind": "world", "split": "val"},
            "dissect": {"enabled": False},
            "explain": {
                "methods": METHODS,
                "precision": "fp32",  # the metrics are recomputed below in fp32
                "chunk_size": 4,
                "batch_size": 3,
                "lime": {
                    "num_samples": 40,
                    "batch_size": 40,
                    "search": {
                        "enabled": True,
                        "grid": [
                            {"segmentation": "slic", "n_segments": 20, "num_samples": 30},
                            {"segmentation": "felzenszwalb", "num_samples": 30},
                        ],
                    },
                },
                "metrics": {"steps": 4, "road": True, "road_percentiles": [30, 70]},
            },
        }
    )
    outcome = run_audit(config, results)
    return config, ResultsStore(results), outcome.run_id


def test_every_explain_table_has_one_row_per_key(explained):
    _, store, run_id = explained
    n_images, n_methods = 6, len(METHODS)
    saliency = store.read("saliency", run_id)
    assert len(store.read("predictions", run_id)) == n_images
    assert len(saliency) == n_images * n_methods and not saliency.duplicated(["image_id", "method"]).any()
    assert len(store.read("agreement", run_id)) == n_images * n_methods * (n_methods - 1) // 2
    assert len(store.read("localization", run_id)) == n_images * n_methods
    assert len(store.read("faithfulness", run_id)) == n_images * n_methods
    trials = store.read("lime_trials", run_id)
    assert len(trials) == n_images * 2 and trials.groupby("image_id")["best"].sum().eq(1).all()
    assert store.read("errors", run_id).empty


def test_metrics_recompute_from_the_saliency_table(explained):
    """The saliency table alone (plus the image and its mask) reproduces every stored metric."""
    config, store, run_id = explained
    from xai_audit.tasks.data.image_sets import iter_image_set, record_row
    from xai_audit.tasks.data.images import load_rgb
    from xai_audit.tasks.data.loaded_models import using_model
    from xai_audit.tasks.explain.stage import ground_truth_mask

    saliency = store.read("saliency", run_id)
    agreement = store.read("agreement", run_id).set_index(["image_id", "method_a", "method_b"])
    localization = store.read("localization", run_id).set_index(["image_id", "method"])
    faithfulness = store.read("faithfulness", run_id).set_index(["image_id", "method"])
    record = record_row(next(iter_image_set(config)))
    maps = {
        row["method"]: decode_map(row) for row in saliency[saliency.image_id == record["image_id"]].to_dict("records")
    }
    for row in agreement_rows(maps, "top_q", 0.2):
        stored = agreement.loc[(record["image_id"], row["method_a"], row["method_b"])]
        assert stored.iou == pytest.approx(row["iou"], abs=1e-6)
        assert stored.spearman == pytest.approx(row["spearman"], abs=1e-5, nan_ok=True)
    with using_model(config, config.models[0]) as model:
        image = load_rgb(record["path"])
        mask = ground_truth_mask(model, record, image.size)
        assert mask.any()
        for method, saliency_map in maps.items():
            expected = localization_row(saliency_map, mask, scaled_tolerance(128))
            stored = localization.loc[(record["image_id"], method)]
            assert (bool(stored.pointing_hit), stored.iou_gt) == (
                expected["pointing_hit"],
                pytest.approx(expected["iou_gt"], abs=1e-6),
            )
        pixels = model.preprocess(image)[None]
        target = int(saliency[saliency.image_id == record["image_id"]].target.iloc[0])
        for method, saliency_map in maps.items():
            deletion, insertion = deletion_insertion(model.module, pixels, saliency_map[None], [target], steps=4)
            stored = faithfulness.loc[(record["image_id"], method)]
            assert stored.deletion_auc == pytest.approx(deletion[0], abs=1e-5)
            assert stored.insertion_auc == pytest.approx(insertion[0], abs=1e-5)
            if method == "lime":
                assert np.isnan(stored.road)
            else:
                road = road_scores(model.module, pixels, saliency_map[None], [target], [30, 70])
                assert np.isfinite(stored.road) and stored.road == pytest.approx(road[0], abs=1e-5)


def test_ground_truth_mask_follows_the_model_geometry():
    """A box drawn on a 200x100 image lands where resize-256 + crop-224 puts it."""
    from types import SimpleNamespace

    from xai_audit.tasks.data.sources.base import standard_preprocess
    from xai_audit.tasks.explain.stage import ground_truth_mask

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    model = SimpleNamespace(preprocess=standard_preprocess(256, 224, mean, std), mean=mean, std=std)
    mask = ground_truth_mask(model, {"image_id": "x", "box": [0, 0, 99, 99]}, (200, 100))
    assert mask.shape == (224, 224)
    # Resize scales 100 -> 256 (x2.56), so the box covers x < 256 of 512, then the crop drops 144 px.
    columns = np.flatnonzero(mask.any(axis=0))
    assert columns.min() == 0 and abs(columns.max() - (256 - 144)) <= 2
    assert mask.all(axis=1).sum() == 0 and mask[:, :100].all()
