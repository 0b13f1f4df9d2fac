"""Adding a method is one new class and one registry entry: a toy explainer and a toy metric,
registered from this test module, flow through the explain stage into ``saliency``,
``scores``, ``summary_methods`` and the report without any other file knowing their names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xai_audit.flows.audit import run_audit
from xai_audit.storage.maps import decode_map
from xai_audit.storage.parquet import ResultsStore
from xai_audit.tasks.core.config import parse_config
from xai_audit.tasks.explain import registry as explainers
from xai_audit.tasks.explain.base import Explainer, Explanations
from xai_audit.tasks.metrics import registry as metrics
from xai_audit.tasks.metrics.base import Metric, Score

N_IMAGES = 4


class CentreExplainer(Explainer):
    """A model-independent map: distance to the image centre, decreasing outward."""

    methods = ("toy_centre",)
    road = False

    def explain(self, context, images, targets, methods):
        height, width = images.shape[-2:]
        rows, cols = np.mgrid[:height, :width]
        centre = 1 - np.hypot(rows - (height - 1) / 2, cols - (width - 1) / 2) / np.hypot(height / 2, width / 2)
        return Explanations({"toy_centre": np.repeat(centre[None].astype(np.float32), len(images), axis=0)})


class PeakMass(Metric):
    """Share of a map's total mass held by its top 10 % of pixels (higher: more concentrated)."""

    name = "toy_peak_mass"
    category = "complexity"
    scores = (Score("toy_peak_mass", "toy_peak_mass", "higher", "peak mass"),)

    def rows(self, batch):
        rows = []
        for method, maps in batch.maps.items():
            for index in np.flatnonzero(batch.usable):
                values = np.clip(maps[index].astype(np.float64).ravel(), 0, None)
                top = np.sort(values)[::-1][: max(1, values.size // 10)]
                rows.append(
                    {
                        "model": batch.model_name,
                        "image_id": batch.image_ids[index],
                        "method": method,
                        "metric": "toy_peak_mass",
                        "value": float(top.sum() / values.sum()) if values.sum() else None,
                    }
                )
        return {"scores": rows}


def peak_mass(saliency_map: np.ndarray) -> float:
    """The toy metric's formula, written again from its docstring."""
    values = np.clip(saliency_map.astype(np.float64).ravel(), 0, None)
    return float(np.sort(values)[::-1][: values.size // 10].sum() / values.sum())


@pytest.fixture(scope="module")
def toy_run(prefect_harness, tmp_path_factory):
    explainer, metric = explainers.register(CentreExplainer()), metrics.register(PeakMass())
    try:
        results = str(tmp_path_factory.mktemp("results"))
        config = parse_config(
            {
                "name": "toy-registry",
                "world": {"n_train": 1, "n_val": N_IMAGES},
                "models": [
                    {
                        "name": "tiny",
                        "source": "python",
                        "callable": "tests.fixtures.tiny_models:tiny_resnet",
                        "num_classes": 3,
                        "preprocess": {"resize": 64, "crop": 64},
                    }
                ],
                "images": {"kind": "world", "split": "val"},
                "dissect": {"enabled": False},
                "explain": {
                    "methods": ["gradcam", "toy_centre", "groupcam"],
                    "chunk_size": 2,
                    "batch_size": 2,
                    "metrics": {"steps": 4},
                },
            }
        )
        from xai_audit.flows.preflight import registry_problems

        assert not list(registry_problems(config))
        outcome = run_audit(config, results)
    finally:
        explainers.unregister(explainer)
        metrics.unregister(metric)
    return ResultsStore(results), outcome


def test_the_toy_explainer_map_lands_in_saliency(toy_run):
    store, outcome = toy_run
    assert outcome.status == "completed"
    saliency = store.read("saliency", outcome.run_id)
    toy = saliency[saliency["method"] == "toy_centre"]
    assert len(toy) == N_IMAGES
    first = decode_map(toy.iloc[0].to_dict())
    assert first.shape == (64, 64) and np.unravel_index(first.argmax(), first.shape) in {
        (31, 31),
        (31, 32),
        (32, 31),
        (32, 32),
    }
    # every built-in metric scored the toy method too (the stage never branches on a method name)
    assert set(store.read("faithfulness", outcome.run_id)["method"]) == {"gradcam", "toy_centre", "groupcam"}


def test_the_toy_metric_is_stored_recomputable_and_summarised(toy_run):
    store, outcome = toy_run
    scores = store.read("scores", outcome.run_id)
    saliency = store.read("saliency", outcome.run_id).set_index(["image_id", "method"])
    assert len(scores) == N_IMAGES * 3 and set(scores["metric"]) == {"toy_peak_mass"}
    for row in scores.itertuples():
        saliency_map = decode_map(saliency.loc[(row.image_id, row.method)].to_dict())
        if np.isnan(row.value):  # a map without positive mass has no peak share
            assert np.clip(saliency_map, 0, None).sum() == 0
        else:
            assert row.value == pytest.approx(peak_mass(saliency_map), abs=1e-9)
    methods = store.read("summary_methods", outcome.run_id).set_index("method")
    for method in ("gradcam", "toy_centre", "groupcam"):
        expected = scores.loc[scores["method"] == method, "value"].mean()  # pandas skips the nulls, as SQL's avg does
        assert dict(methods.loc[method, "scores"])["toy_peak_mass"] == pytest.approx(expected)


def test_the_report_shows_the_toy_method_and_metric_with_its_direction(toy_run):
    store, outcome = toy_run
    html = Path(outcome.report_path).read_text(encoding="utf-8")
    assert "toy_centre" in html
    assert "groupcam" in html  # a built-in added the same way (tasks/explain/groupcam.py + one CAM_METHODS line)
    assert "peak mass ↑" in html or "toy_peak_mass ↑" in html


def test_a_taken_name_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="registered already"):
        explainers.register(type("Clash", (CentreExplainer,), {"methods": ("gradcam",)})())
    with pytest.raises(ValueError, match="registered already"):
        metrics.register(type("Clash", (PeakMass,), {"name": "faithfulness"})())


def test_an_unknown_method_names_the_registered_ones():
    from xai_audit.tasks.core.errors import ConfigError

    with pytest.raises(ConfigError, match="scorecam"):
        explainers.explainer("telepathycam")
