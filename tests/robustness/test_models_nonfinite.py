"""The model cases of the bad-input matrix: NaN/Inf outputs or activations are flagged, never averaged in."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tests.robustness.audit_files import tiny_audit, write_images
from tests.robustness.nan_models import NanUnitNet
from xai_audit.flows.audit import run_audit
from xai_audit.storage.maps import decode_map
from xai_audit.storage.parquet import ResultsStore
from xai_audit.tasks.core.config import WorldConfig, parse_config
from xai_audit.tasks.dissect.probe import Probe
from xai_audit.tasks.dissect.stage import finite_clip_dissect_rows, netdissect_rows
from xai_audit.tasks.world.synthetic import generate_world

NOISE = [f"img{index}.png" for index in range(3)]
WHITE = ["white0.png", "white1.png"]


@pytest.fixture
def noise_and_white(tmp_path) -> Path:
    """Three noise images the models handle and two white ones :func:`nan_on_bright` returns NaN for."""
    folder = tmp_path / "images"
    write_images(folder, count=len(NOISE))
    for name in WHITE:
        Image.new("RGB", (32, 32), "white").save(folder / name)
    return folder


def audit(images: Path, callable_name: str, methods: list[str], results: Path):
    data = tiny_audit(str(images))
    data["models"][0]["callable"] = f"tests.robustness.nan_models:{callable_name}"
    data["explain"].update(
        {
            "methods": methods,
            "chunk_size": 5,
            "batch_size": 5,
            "lime": {
                "segmentation": "slic",
                "segmentation_params": {"n_segments": 8},
                "num_samples": 24,
                "batch_size": 24,
            },
        }
    )
    outcome = run_audit(parse_config(data), str(results))
    store = ResultsStore(results)
    return outcome, {
        table: store.read(table, outcome.run_id)
        for table in ("predictions", "saliency", "agreement", "faithfulness", "errors")
    }


def test_nan_outputs_flag_their_images_and_leave_every_metric_of_the_rest_finite(
    prefect_harness, noise_and_white, tmp_path
):
    outcome, tables = audit(noise_and_white, "nan_on_bright", ["gradcam", "lime"], tmp_path / "results")
    errors = tables["errors"]
    assert sorted(errors["item_id"]) == WHITE
    assert set(errors["error_type"]) == {"NonFiniteOutputError"} and set(errors["stage"]) == {"explain"}
    assert outcome.status == "partial" and outcome.n_errors == len(WHITE)
    assert sorted(tables["predictions"]["image_id"]) == NOISE and np.isfinite(tables["predictions"]["prob"]).all()
    saliency = tables["saliency"]
    assert sorted(saliency["image_id"]) == sorted(NOISE * 2)  # gradcam and lime of every noise image, LIME included
    assert all(np.isfinite(decode_map(row)).all() for row in saliency.to_dict("records"))
    assert len(tables["agreement"]) == len(NOISE) and np.isfinite(tables["agreement"]["iou"]).all()
    faithfulness = tables["faithfulness"]
    assert len(faithfulness) == 2 * len(NOISE)
    assert np.isfinite(faithfulness[["deletion_auc", "insertion_auc"]].to_numpy()).all()


def test_inf_on_perturbed_inputs_flags_the_metric_instead_of_storing_nan(prefect_harness, noise_and_white, tmp_path):
    for name in WHITE:
        (noise_and_white / name).unlink()
    outcome, tables = audit(noise_and_white, "inf_on_flat", ["gradcam"], tmp_path / "results")
    assert sorted(tables["predictions"]["image_id"]) == NOISE  # the images themselves are fine
    assert len(tables["saliency"]) == len(NOISE)
    assert tables["faithfulness"].empty  # every deletion/insertion curve met an Inf: no AUC rather than a NaN one
    errors = tables["errors"]
    assert sorted(errors["item_id"]) == NOISE and set(errors["error_type"]) == {"NonFiniteMetricError"}
    assert errors["message"].str.contains("gradcam faithfulness").all()
    assert outcome.status == "partial"


# --------------------------------------------------------------------------- dissect stage


def _probe(ids: list[str]) -> Probe:
    return Probe(
        root="unused", split=None, identity="test", image_ids=ids, paths=[f"/nowhere/{i}" for i in ids], errors=[]
    )


def test_clip_dissect_leaves_out_nan_images_and_broken_units_and_names_them():
    generator = torch.Generator().manual_seed(0)
    n_images = 120  # soft-WPMI, the default, needs at least its top_k = 100 images
    activations = torch.rand(n_images, 4, generator=generator)
    activations[2, 0] = float("nan")  # one image breaks in one unit: the image goes
    activations[:, 3] = float("inf")  # one unit is broken on every image: the unit goes
    concepts = ["red", "green", "blue", "stripes", "dots"]
    similarity = torch.rand(n_images, len(concepts), generator=generator)
    ids = [f"p{index}.png" for index in range(n_images)]
    config = parse_config({})
    frame, errors = finite_clip_dissect_rows(config, similarity, activations, _probe(ids), concepts, {}, "m", "layer1")
    assert sorted(frame["unit"]) == [0, 1, 2]  # the layer's own unit numbers, unit 3 left unlabelled
    assert np.isfinite(frame["score"].astype(float)).all()
    assert all("p2.png" not in images for images in frame["top_images"])
    assert {(row["item_id"], row["error_type"]) for row in errors} == {
        ("m/layer1/unit 3", "NonFiniteActivationError"),
        ("p2.png", "NonFiniteActivationError"),
    }
    # the surviving units are labelled exactly as if the broken image and unit had never existed
    keep = [index for index in range(n_images) if index != 2]
    clean, no_errors = finite_clip_dissect_rows(
        config, similarity[keep], activations[keep][:, :3], _probe([ids[i] for i in keep]), concepts, {}, "m", "layer1"
    )
    assert no_errors == []
    pd.testing.assert_frame_equal(frame.reset_index(drop=True), clean.reset_index(drop=True))


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    root = generate_world(tmp_path_factory.mktemp("world") / "w", WorldConfig(image_size=32, n_train=1, n_val=8))
    return root


def test_netdissect_leaves_out_images_with_nan_activations_and_names_them(small_world, tmp_path):
    from xai_audit.tasks.data.images import BrodenProbeSet

    items = [item for item in BrodenProbeSet(small_world, split="val")]
    ids, paths = [item.image_id for item in items], [str(item.path) for item in items]
    bright = ids[1:3]
    for image_id, path in zip(ids, paths):
        if image_id in bright:  # same file name, now white: the model's activations for it are NaN
            Image.new("RGB", (32, 32), "white").save(path)
    probe = Probe(root=str(small_world), split="val", identity="nan-test", image_ids=ids, paths=paths, errors=[])
    module = NanUnitNet(broken_unit=False).eval()
    model = SimpleNamespace(module=module, preprocess=lambda image: _normalised(image))
    config = parse_config({"device": "cpu", "dissect": {"probe": {"batch_size": 3}, "netdissect": {"quantile": 0.1}}})
    nonfinite: dict[str, None] = {}
    frames = netdissect_rows(config, model, ["features"], probe, nonfinite)
    assert list(nonfinite) == bright
    frame = frames["features"]
    assert sorted(frame["unit"]) == [0, 1, 2, 3] and np.isfinite(frame["score"].astype(float)).all()
    assert all(not set(bright) & set(images) for images in frame["top_images"])


def _normalised(image: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(image.convert("RGB").resize((32, 32)), dtype=np.float32) / 255).permute(
        2, 0, 1
    )
    return (pixels - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[
        :, None, None
    ]
