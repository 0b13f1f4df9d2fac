"""The audit flow end to end on a tiny model and a generated folder of images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from xai_audit.flows.audit import run_audit
from xai_audit.storage.maps import decode_map
from xai_audit.storage.parquet import ResultsStore
from xai_audit.storage.runs import RunRecord
from xai_audit.tasks.compute.precision import describe_cpu_kernels
from xai_audit.tasks.core.config import parse_config

CLASSES = ["a", "b", "c"]


@pytest.fixture()
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for index in range(7):
        folder = tmp_path / "images" / CLASSES[index % 3]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(folder / f"img {index}.png")
    (tmp_path / "images" / "b" / "broken.jpg").write_bytes(b"not a jpeg at all")
    return tmp_path / "images"


def tiny_config(image_folder, **explain):
    return parse_config(
        {
            "name": "tiny",
            "models": [
                {
                    "name": "tiny",
                    "source": "python",
                    "callable": "tests.fixtures.tiny_models:tiny_resnet",
                    "class_names": CLASSES,
                    "preprocess": {"resize": 64, "crop": 64},
                }
            ],
            "images": {"kind": "folder", "root": str(image_folder)},
            "dissect": {"enabled": False},
            "explain": {"methods": ["gradcam"], "chunk_size": 3, "batch_size": 2, "topk": 2, **explain},
        }
    )


def test_flow_writes_predictions_and_maps_and_records_failures(prefect_harness, image_folder, tmp_path):
    results = str(tmp_path / "results")
    outcome = run_audit(tiny_config(image_folder), results)
    store = ResultsStore(results)
    predictions = store.read("predictions", outcome.run_id)
    saliency = store.read("saliency", outcome.run_id)
    errors = store.read("errors", outcome.run_id)
    assert sorted(predictions["image_id"]) == sorted(f"{CLASSES[i % 3]}/img {i}.png" for i in range(7))
    assert set(predictions["true_label"]) == {0, 1, 2}
    assert all(len(topk) == 2 and topk[0]["prob"] >= topk[1]["prob"] for topk in predictions["topk"])
    assert len(saliency) == 7 and set(saliency["method"]) == {"gradcam"}
    assert all(decode_map(row).shape == (64, 64) for row in saliency.to_dict("records"))
    assert errors["item_id"].tolist() == ["b/broken.jpg"]
    assert errors["stage"].tolist() == ["explain"] and errors["message"][0]
    run = RunRecord.load(store, outcome.run_id)
    assert (outcome.status, run.status, run.n_errors) == ("partial", "partial", 1)
    assert run.finished_at is not None and run.timings["explain"] > 0
    assert run.cpu_kernels == describe_cpu_kernels() and "bf16:" in run.cpu_kernels  # the CPU's precision path


def test_resuming_a_run_redoes_only_missing_chunks_without_duplicates(prefect_harness, image_folder, tmp_path):
    results = str(tmp_path / "results")
    config = tiny_config(image_folder)
    first = run_audit(config, results)
    store = ResultsStore(results)
    before = store.read("saliency", first.run_id).sort_values("image_id").reset_index(drop=True)
    lost = store.files("saliency", first.run_id)[1]
    import os

    os.remove(lost)
    resumed = run_audit(config, results, resume=first.run_id)
    after = store.read("saliency", first.run_id).sort_values("image_id").reset_index(drop=True)
    assert resumed.run_id == first.run_id
    assert after[["image_id", "method", "target"]].equals(before[["image_id", "method", "target"]])
    assert (after["map"] == before["map"]).all()


def test_resume_refuses_a_different_config(prefect_harness, image_folder, tmp_path):
    from xai_audit.tasks.core.config import ConfigErrors

    results = str(tmp_path / "results")
    first = run_audit(tiny_config(image_folder), results)
    with pytest.raises(ConfigErrors, match="another config"):
        run_audit(tiny_config(image_folder, topk=3), results, resume=first.run_id)
