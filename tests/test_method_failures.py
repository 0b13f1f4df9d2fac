"""One method's failure is not the run's: a method that raises becomes an ``errors`` row for its
model and method, and every other method's rows are written.

The failing method is real, not mocked: AblationCAM on a model that refuses forwards of more than
8 images (``tests/fixtures/tiny_models.py``), which grad-cam's procedure (one image copy per
ablated channel, 16 channels) needs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from xai_audit.tasks.core.config import parse_config
from xai_audit.tasks.data.models import load_model
from xai_audit.tasks.explain.base import ExplainContext, Explainer, Explanations
from xai_audit.tasks.explain.stage import explain_family, explain_records

METHODS = ["gradcam", "gradcam++", "ablationcam"]


def _config(folder):
    return parse_config(
        {
            "device": "cpu",
            "models": [
                {
                    "name": "bound",
                    "source": "python",
                    "callable": "tests.fixtures.tiny_models:batch_limited_cnn",
                    "num_classes": 3,
                    "cam_layer": "features.2",
                    "preprocess": {"resize": 64, "crop": 64},
                }
            ],
            "images": {"kind": "folder", "root": str(folder)},
            "dissect": {"enabled": False},
            "explain": {"methods": METHODS, "batch_size": 4, "metrics": {"localization": False, "batch_size": 8}},
        }
    )


def _records(folder, count=5):
    rng = np.random.default_rng(0)
    folder.mkdir()
    records = []
    for index in range(count):
        path = folder / f"{index}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        records.append({"image_id": path.name, "path": str(path)})
    return records


def test_a_method_that_raises_leaves_its_siblings_maps_and_one_error_row_per_batch(tmp_path):
    records = _records(tmp_path / "images")
    config = _config(tmp_path / "images")
    model = load_model(config.models[0])
    rows = explain_records(config, config.models[0], model, records)
    saliency = rows.tables["saliency"]
    assert sorted({row["method"] for row in saliency}) == ["gradcam", "gradcam++"]
    assert len(saliency) == 2 * len(records)  # every image keeps both working maps
    assert {row["method"] for row in rows.tables["faithfulness"]} == {"gradcam", "gradcam++"}
    assert len(rows.tables["predictions"]) == len(records)
    errors = rows.tables["errors"]
    assert len(errors) == 2  # batches of 4 and 1
    assert {(e["item_id"], e["model"], e["error_type"]) for e in errors} == {("ablationcam", "bound", "ValueError")}
    assert "ablationcam failed on 0.png and 3 more: ValueError: this model takes at most 8" in errors[0]["message"]


class _OutOfMemory(Explainer):
    methods = ("toy-oom",)

    def explain(self, context, images, targets, methods) -> Explanations:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_running_out_of_memory_is_not_a_method_failure_it_reaches_the_back_off():
    context = ExplainContext(None, torch.nn.Identity(), None, 0, None, ["a"])
    with pytest.raises(RuntimeError, match="out of memory"):
        list(explain_family(_OutOfMemory(), context, torch.zeros(1, 3, 4, 4), [0], ["toy-oom"]))


def test_a_method_whose_map_of_an_image_is_not_finite_loses_that_image_alone(tmp_path):
    """Grad-CAM's map of the white image is NaN (its CAM layer carries a NaN channel there, the
    head never reads it, so the model's outputs stay finite); the Gaussian control's map of the same
    image is finite and must keep its saliency, metric and prediction rows."""
    folder = tmp_path / "images"
    records = _records(folder, count=3)
    white = folder / "white.png"
    Image.fromarray(np.full((64, 64, 3), 255, dtype=np.uint8)).save(white)
    records.append({"image_id": white.name, "path": str(white)})
    config = parse_config(
        {
            "device": "cpu",
            "models": [
                {
                    "name": "poisoned",
                    "source": "python",
                    "callable": "tests.fixtures.tiny_models:nan_channel_cnn",
                    "num_classes": 3,
                    "cam_layer": "poison",
                    "preprocess": {"resize": 64, "crop": 64},
                }
            ],
            "images": {"kind": "folder", "root": str(folder)},
            "dissect": {"enabled": False},
            "explain": {"methods": ["gradcam", "control_gaussian"], "metrics": {"localization": False}},
        }
    )
    model = load_model(config.models[0])
    rows = explain_records(config, config.models[0], model, records)
    maps = {(row["image_id"], row["method"]) for row in rows.tables["saliency"]}
    noise_ids = [record["image_id"] for record in records[:3]]
    assert maps == {(i, m) for i in noise_ids for m in ("gradcam", "control_gaussian")} | {
        ("white.png", "control_gaussian")
    }
    faithfulness = {(row["image_id"], row["method"]) for row in rows.tables["faithfulness"]}
    assert faithfulness == maps
    assert {row["image_id"] for row in rows.tables["predictions"]} == {*noise_ids, "white.png"}
    errors = {(row["item_id"], row["error_type"]) for row in rows.tables["errors"]}
    assert errors == {("white.png", "NonFiniteMapError")}
    assert rows.tables["errors"][0]["message"].startswith("gradcam: saliency map has 4096 NaN/Inf value(s)")
    assert not [row for row in rows.tables["agreement"] if row["image_id"] == "white.png"]
