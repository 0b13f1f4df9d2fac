"""Sanity checks and controls on ground truth we built: model-independent maps, the trained demo
model, randomised copies whose weights we can inspect, and a dataset made to fool a metric.

What the references compute, read in Quantus (understandable-machine-intelligence-lab/Quantus):
``quantus/metrics/randomisation/mprt.py`` (cascading ``top_down`` randomisation, Spearman of
absolute, max-normalised maps), ``smooth_mprt.py`` (bottom-up, maps averaged over noisy inputs),
``efficient_mprt.py`` (relative rise of ``discrete_entropy``: scipy's entropy of a 100-bin
``np.histogram``), ``random_logit.py``, and ``helpers/model/pytorch_model.py``'s
``get_random_layer_generator`` (``reset_parameters()`` of every module that has one).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import stats
from skimage.metrics import structural_similarity

from tests.fixtures.margins import assert_at_least, assert_at_most
from xai_audit.storage.maps import decode_map
from xai_audit.storage.parquet import ResultsStore
from xai_audit.storage.schemas import SUMMARY_TABLES
from xai_audit.tasks.core.config import parse_config
from xai_audit.tasks.data.image_sets import iter_image_set, record_row
from xai_audit.tasks.data.images import load_rgb
from xai_audit.tasks.data.loaded_models import using_model
from xai_audit.tasks.explain.base import ExplainContext
from xai_audit.tasks.explain.cams import forward_with_cams
from xai_audit.tasks.explain.controls import ControlFamily, centred_gaussian
from xai_audit.tasks.explain.registry import control_methods
from xai_audit.tasks.explain.sanity import cascade, fully_randomised, randomisation_blocks, sanity_rows, similarities
from xai_audit.tasks.explain.stage import ground_truth_mask
from xai_audit.tasks.metrics.maps import deletion_insertion, localization_row, map_iou, pointing_hit, scaled_tolerance
from xai_audit.tasks.results.findings import findings
from xai_audit.tasks.results.summary import (
    SANITY_PASS_BELOW,
    empty_frame,
    method_leaderboard,
    sanity_curves,
    sanity_verdicts,
    with_sanity,
)

CONTROLS = ["control_random", "control_gaussian", "control_edges"]
SANITY_IMAGES = 6


@pytest.fixture(scope="module")
def demo_sanity(tmp_path_factory):
    """The demo model's sanity rows (Grad-CAM at the demo's CAM layer and the three controls on six
    held-out images), written to and read back from a results store."""
    config = parse_config(
        {
            "models": [{"name": "demo-resnet18", "source": "demo", "cam_layer": "layer3"}],
            "images": {"kind": "world", "split": "val", "limit": SANITY_IMAGES},
            "explain": {
                "methods": ["gradcam", *CONTROLS],
                "sanity": {"enabled": True, "images": SANITY_IMAGES, "tests": ["cascading", "emprt", "random_logit"]},
            },
        }
    )
    records = [record_row(item) for item in iter_image_set(config)]
    with using_model(config, config.models[0]) as model:
        rows = sanity_rows(config, config.models[0], model, records)
    assert rows["errors"] == []
    store = ResultsStore(str(tmp_path_factory.mktemp("sanity")))
    store.write("sanity", "run", "demo-sanity", rows["sanity"])
    return store.read("sanity", "run")


def _final(sanity: pd.DataFrame, test: str = "cascading") -> pd.DataFrame:
    rows = sanity[sanity["test"] == test]
    return rows[rows["step"] == rows["step"].max()]


@pytest.mark.slow
@pytest.mark.demo_model
def test_model_independent_explainers_fail_model_randomisation(demo_sanity):
    final = _final(demo_sanity).groupby("method")[["spearman", "ssim"]].mean()
    for control in CONTROLS:
        assert_at_least(f"{control} Spearman after full randomisation", final.loc[control, "spearman"], 0.9)
        assert_at_least(f"{control} SSIM after full randomisation", final.loc[control, "ssim"], 0.9)
    verdicts = sanity_verdicts(demo_sanity).set_index("method")
    assert [verdicts.loc[control, "sanity_passed"] for control in CONTROLS] == [False, False, False]
    # eMPRT: a map that ignores the weights gains no complexity when they are randomised
    assert verdicts.loc[CONTROLS, "emprt"].abs().max() < 1e-9


@pytest.mark.slow
@pytest.mark.demo_model
def test_gradcam_on_the_trained_demo_model_passes_and_its_similarity_falls_with_randomisation(demo_sanity):
    curve = sanity_curves(demo_sanity)
    gradcam = curve[(curve["method"] == "gradcam") & (curve["test"] == "cascading")].set_index("step")
    assert gradcam.loc[0, "spearman_mean"] == pytest.approx(1.0)
    assert gradcam.loc[1, "layer"] == "fc", "cascading starts at the output layer"
    randomised = gradcam.loc[1:, "spearman_mean"]
    assert len(randomised) == 11
    assert_at_most("Grad-CAM Spearman, most similar randomised step", randomised.max(), 0.7)
    verdicts = sanity_verdicts(demo_sanity).set_index("method")
    assert_at_most("Grad-CAM sanity Spearman", verdicts.loc["gradcam", "sanity_spearman"], SANITY_PASS_BELOW)
    assert verdicts.loc["gradcam", "sanity_passed"] is True
    # the fully randomised model's maps are more complex
    assert_at_least("Grad-CAM eMPRT (relative entropy rise)", verdicts.loc["gradcam", "emprt"], 0.2)
    assert_at_most("Grad-CAM random-logit SSIM", verdicts.loc["gradcam", "random_logit_ssim"], 0.5)
    assert_at_least("control_edges random-logit SSIM", verdicts.loc["control_edges", "random_logit_ssim"], 0.5)


@pytest.mark.slow
@pytest.mark.demo_model
def test_every_stored_similarity_recomputes_from_the_stored_maps(demo_sanity):
    key = ["method", "test", "image_id"]
    reference = {
        tuple(row[k] for k in key): decode_map(row) for row in demo_sanity[demo_sanity["step"] == 0].to_dict("records")
    }
    for row in demo_sanity.to_dict("records"):
        ours, base = decode_map(row), reference[tuple(row[k] for k in key)]
        assert similarities(base, ours, 0.2) == pytest.approx(
            {"spearman": row["spearman"], "ssim": row["ssim"], "iou": row["iou"]}, abs=0, nan_ok=True
        )
        # and the same values from the libraries directly: Spearman is scale-free, SSIM on max-scaled |maps|
        a, b = np.abs(base.astype(np.float64)), np.abs(ours.astype(np.float64))
        if a.min() < a.max() and b.min() < b.max():
            assert stats.spearmanr(a.ravel(), b.ravel()).statistic == pytest.approx(row["spearman"], abs=1e-12)
        scaled_a, scaled_b = (x / x.max() if x.max() > 0 else x for x in (a, b))  # an all-zero map stays zero
        expected_ssim = structural_similarity(scaled_a, scaled_b, data_range=1.0)
        assert expected_ssim == pytest.approx(row["ssim"], abs=1e-12)
        assert map_iou(a, b, "top_q", 0.2) == row["iou"]
        histogram, _ = np.histogram(ours.astype(np.float64), bins=100)
        assert stats.entropy(histogram) == pytest.approx(row["entropy"], abs=1e-12)


def _tiny_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU()),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    ).eval()


def test_cascading_randomises_one_more_block_per_step_from_the_output_down():
    model = _tiny_cnn()
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)  # a trained BatchNorm's statistics
    trained = {name: value.clone() for name, value in model.state_dict().items()}
    blocks = randomisation_blocks(model)
    assert [name for name, _ in blocks] == ["0", "1", "3.0", "6"], (
        "containers are opened, parameter-free modules skipped"
    )
    steps = list(cascade(model, blocks, seed=7))
    assert [block for _, block, _ in steps] == ["6", "3.0", "1", "0"]
    for step, _, copy in steps:
        state = copy.state_dict()
        changed = {
            block
            for block, _ in blocks
            if any(not torch.equal(state[name], trained[name]) for name in trained if name.startswith(f"{block}."))
        }
        assert changed == {name for name, _ in blocks[::-1][:step]}, step
    assert all(torch.equal(value, trained[name]) for name, value in model.state_dict().items()), "trained model kept"
    bottom_up_last = list(cascade(model, blocks, seed=7, order="bottom_up"))[-1][2]
    for one, other in ((steps[-1][2], bottom_up_last), (steps[-1][2], fully_randomised(model, blocks, seed=7))):
        assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), other.state_dict().values()))
    assert len(randomisation_blocks(model, "modules")) == 4


CONTROL_IMAGES = 100
# How much better Grad-CAM (demo CAM layer) scores than each control on CONTROL_IMAGES held-out
# images, asserted on every demo recipe variant. Measured (benchmarks/results/demo-spread.md) on the
# default recipe: pointing accuracy Grad-CAM 0.91 vs random 0.19, Gaussian 0.55, edges 0.87;
# deletion AUC 0.26 vs 0.57, 0.38, 0.65. The edge control hits the shape nearly as often as
# Grad-CAM does (a flat shape's outline is within the pointing tolerance of the shape), so the
# pointing game only asks Grad-CAM not to lose to it; deletion separates them clearly. On 16
# images the two tied at 15/16 on an AMX CPU (issue 37).
POINTING_MARGIN = {"control_random": 0.4, "control_gaussian": 0.15, "control_edges": 0.0}
DELETION_MARGIN = {"control_random": 0.15, "control_gaussian": 0.05, "control_edges": 0.2}


@pytest.fixture(scope="module")
def demo_maps():
    """The demo model, 100 held-out images with masks, Grad-CAM and the three controls' maps."""
    config = parse_config({"images": {"kind": "world", "split": "val", "limit": CONTROL_IMAGES}})
    records = [record_row(item) for item in iter_image_set(config)]
    with using_model(config, config.models[0]) as model:
        images = [load_rgb(record["path"]) for record in records]
        pixels = torch.stack([model.preprocess(image) for image in images])
        masks = np.stack([ground_truth_mask(model, record, image.size) for record, image in zip(records, images)])
        labels = [model.class_names.index(record["label_name"]) for record in records]
        _, maps = forward_with_cams(model.module, model.module.get_submodule("layer3"), pixels, labels, ["gradcam"])
        context = ExplainContext(model, None, config.explain, 0, None, [record["image_id"] for record in records])
        maps.update(ControlFamily().explain(context, pixels, labels, CONTROLS).maps)
        yield model, pixels, masks, labels, maps, context


@pytest.mark.slow
@pytest.mark.demo_model
def test_controls_score_worse_than_gradcam_on_the_pointing_game_and_deletion(demo_maps):
    model, pixels, masks, labels, maps, _ = demo_maps
    tolerance = scaled_tolerance(masks.shape[-1])
    pointing = {name: np.mean([pointing_hit(m, k, tolerance) for m, k in zip(m_, masks)]) for name, m_ in maps.items()}
    deletion = {
        name: deletion_insertion(model.module, pixels, m_, labels, steps=5, baseline="mean")[0].mean()
        for name, m_ in maps.items()
    }
    assert len(pixels) == CONTROL_IMAGES
    for control in CONTROLS:
        gain = pointing["gradcam"] - pointing[control]
        assert_at_least(f"pointing: Grad-CAM minus {control}", gain, POINTING_MARGIN[control])
        assert_at_least(
            f"deletion: {control} minus Grad-CAM", deletion[control] - deletion["gradcam"], DELETION_MARGIN[control]
        )


def _disc(side: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    rows, cols = np.indices((side, side))
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def _leaderboard(centred: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Localization of a genuine but imperfect method (it points at the object in 14 of 20 images, at a
    corner otherwise) and of the centred Gaussian, on objects at the centre or scattered."""
    side, rng = 64, np.random.default_rng(0)
    rows = []
    for index in range(20):
        centre = (31.5, 31.5) if centred else tuple(rng.choice([12.0, 52.0], size=2))
        mask = _disc(side, centre, 8)
        pointed = centre if index < 14 else (2.0, 2.0)
        method_map = np.exp(-((np.indices((side, side)) - np.reshape(pointed, (2, 1, 1))) ** 2).sum(0) / 50)
        for method, saliency_map in (("gradcam", method_map), ("control_gaussian", centred_gaussian(side, side))):
            row = localization_row(saliency_map, mask, scaled_tolerance(side))
            rows.append({"model": "m", "image_id": f"{index}", "method": method, **row})
    localization = pd.DataFrame(rows)
    saliency = localization[["model", "image_id", "method"]].assign(target=0)
    empty = pd.DataFrame()
    return with_sanity(method_leaderboard(saliency, empty, localization, empty), pd.DataFrame())


def test_a_metric_fooled_by_centred_objects_raises_the_control_flag():
    assert {"control_gaussian"} <= control_methods() and "gradcam" not in control_methods()
    methods, flags = _leaderboard(centred=True)
    fooled = flags[flags["metric"] == "pointing_accuracy"]
    assert fooled[["control", "method"]].values.tolist() == [["control_gaussian", "gradcam"]]
    assert fooled["control_value"].iloc[0] == 1.0 and fooled["method_value"].iloc[0] == pytest.approx(0.7)
    gradcam = methods.set_index("method").loc["gradcam"]
    assert "pointing_accuracy" in gradcam["beaten_by_control"] and not gradcam["control"]
    lines = findings("run", _summary(methods, flags), {}, 0)
    assert any(
        "a control beats a real method on pointing_accuracy (control_gaussian > gradcam)" in line for line in lines
    )
    # the same method on scattered objects: the Gaussian misses them and nothing is flagged
    _, honest = _leaderboard(centred=False)
    assert honest.empty


def _summary(methods: pd.DataFrame, flags: pd.DataFrame) -> dict[str, pd.DataFrame]:
    tables = {name: empty_frame(name) for name in SUMMARY_TABLES if not name.startswith("summary_drift_")}
    return {**tables, "summary_methods": methods, "summary_control_flags": flags}


@pytest.mark.demo_model
def test_control_maps_ignore_the_model(demo_maps):
    _, pixels, _, labels, maps, context = demo_maps
    again = ControlFamily().explain(context, pixels, [0] * len(labels), CONTROLS).maps
    for control in CONTROLS:
        np.testing.assert_array_equal(again[control], maps[control])  # other targets, same maps
    assert math.isclose(float(maps["control_gaussian"][0].max()), 1.0, rel_tol=1e-3)
    assert not np.array_equal(maps["control_random"][0], maps["control_random"][1]), "seeded per image"


@pytest.mark.slow
def test_the_audit_flow_writes_the_sanity_table_and_names_failing_methods(prefect_harness, tmp_path):
    from xai_audit.flows.audit import run_audit
    from xai_audit.tasks.results.findings import run_findings

    rng = np.random.default_rng(0)
    for index in range(4):
        folder = tmp_path / "images" / "abc"[index % 3]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(folder / f"img{index}.png")
    config = parse_config(
        {
            "name": "sanity",
            "models": [
                {
                    "name": "tiny",
                    "source": "python",
                    "callable": "tests.fixtures.tiny_models:tiny_resnet",
                    "class_names": ["a", "b", "c"],
                    "preprocess": {"resize": 64, "crop": 64},
                }
            ],
            "images": {"kind": "folder", "root": str(tmp_path / "images")},
            "dissect": {"enabled": False},
            "explain": {
                "methods": ["gradcam", "control_edges"],
                "chunk_size": 2,
                "metrics": {"steps": 4, "localization": False},
                "sanity": {
                    "enabled": True,
                    "images": 3,
                    "tests": ["cascading", "random_logit", "smprt"],
                    "smprt_samples": 2,
                },
            },
        }
    )
    results = str(tmp_path / "results")
    outcome = run_audit(config, results)
    store = ResultsStore(results)
    sanity = store.read("sanity", outcome.run_id)
    steps = sanity.loc[sanity["test"] == "cascading", "step"].max()
    assert len(sanity) == 2 * 3 * (2 * (steps + 1) + 2), "two methods, three images, two cascades, random logit"
    assert set(sanity["image_id"]) == {"a/img0.png", "a/img3.png", "b/img1.png"}, "the first images of the set"
    smprt = sanity[sanity["test"] == "smprt"]
    assert smprt.loc[smprt["step"] == 1, "layer"].eq("conv1").all(), "sMPRT randomises from the input up"
    assert smprt.loc[smprt["method"] == "control_edges", "spearman"].min() >= 0.99
    methods = store.read("summary_methods", outcome.run_id).set_index("method")
    assert methods.loc["control_edges", "control"] and not methods.loc["gradcam", "control"]
    assert methods.loc["control_edges", "sanity_passed"] == False  # noqa: E712 - a nullable boolean column
    digest = "\n".join(run_findings(store, outcome.run_id))
    assert "control_edges (control, fails sanity)" in digest and "control_edges 1.000 FAIL" in digest
    report = (tmp_path / "results" / "reports" / outcome.run_id / "index.html").read_text()
    assert "Sanity checks" in report and "sanity-tiny-cascading.png" in report
    assert run_audit(config, results, resume=outcome.run_id).run_id == outcome.run_id
    assert len(store.read("sanity", outcome.run_id)) == len(sanity), "a finished sanity unit is not redone"
