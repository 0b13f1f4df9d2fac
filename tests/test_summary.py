"""The summary tables: their numbers recomputed independently from the raw tables, hand-built
ground truth for the neuron statistics, empty runs, and idempotent rewrites."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.fixtures.audit_runs import LAYERS, METHODS, N_IMAGES, two_audited_runs
from xai_audit.flows.cli import main
from xai_audit.storage.parquet import ResultsStore
from xai_audit.storage.runs import RunRecord
from xai_audit.storage.schemas import SUMMARY_TABLES
from xai_audit.tasks.metrics.base import Metric, Score
from xai_audit.tasks.metrics.registry import register, unregister
from xai_audit.tasks.results import figures
from xai_audit.tasks.results.report import leaderboard_table, write_report
from xai_audit.tasks.results.summary import (
    RUN_SUMMARY_TABLES,
    method_leaderboard,
    score_map,
    summarize_run,
    summary_tables,
)


@pytest.fixture(scope="module")
def runs(prefect_harness, tmp_path_factory):
    return two_audited_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def first(runs):
    """(store, run id) of the first run, whose summary the flow wrote."""
    return runs.store, runs.first.run_id


def test_the_flow_writes_every_summary_table_once(first):
    store, run_id = first
    for table in RUN_SUMMARY_TABLES:
        assert len(store.files(table, run_id)) == 1, table
    assert len(store.read("summary_pairs", run_id)) == len(METHODS) * (len(METHODS) - 1) // 2
    assert len(store.read("summary_images", run_id)) == N_IMAGES


def test_pair_statistics_equal_numpy_over_the_agreement_rows(first):
    store, run_id = first
    summary = store.read("summary_pairs", run_id).set_index(["model", "method_a", "method_b"])
    for key, rows in store.read("agreement", run_id).groupby(["model", "method_a", "method_b"]):
        iou, spearman = rows["iou"].to_numpy(np.float64), rows["spearman"].to_numpy(np.float64)
        got = summary.loc[key]
        assert got["images"] == len(rows)
        assert got["iou_mean"] == pytest.approx(iou.mean())
        assert got["iou_median"] == pytest.approx(np.median(iou))
        assert got["iou_std"] == pytest.approx(iou.std())
        assert got["spearman_mean"] == pytest.approx(np.nanmean(spearman))
        assert got["spearman_median"] == pytest.approx(np.nanmedian(spearman))
        assert got["spearman_std"] == pytest.approx(np.nanstd(spearman))


def test_method_leaderboards_equal_the_raw_metric_means(first):
    store, run_id = first
    methods = store.read("summary_methods", run_id).set_index("method")
    localization, faithfulness = store.read("localization", run_id), store.read("faithfulness", run_id)
    agreement = store.read("agreement", run_id)
    assert sorted(methods.index) == sorted(METHODS)
    for method in METHODS:
        hits = localization.loc[localization["method"] == method, "pointing_hit"].astype(bool)
        rows = faithfulness[faithfulness["method"] == method]
        involved = agreement[(agreement["method_a"] == method) | (agreement["method_b"] == method)]
        assert methods.loc[method, "pointing_accuracy"] == pytest.approx(hits.sum() / len(hits))
        assert methods.loc[method, "deletion_auc_mean"] == pytest.approx(rows["deletion_auc"].astype(float).mean())
        assert methods.loc[method, "insertion_auc_mean"] == pytest.approx(rows["insertion_auc"].astype(float).mean())
        assert methods.loc[method, "agreement_iou_mean"] == pytest.approx(involved["iou"].astype(float).mean())
    by_faithfulness = (methods["insertion_auc_mean"] - methods["deletion_auc_mean"]).sort_values(ascending=False)
    assert list(methods["faithfulness_rank"].sort_values().index) == list(by_faithfulness.index)
    assert methods["localization_rank"].min() == 1
    assert (
        methods.loc[methods["localization_rank"] == 1, "pointing_accuracy"].iloc[0]
        == methods["pointing_accuracy"].max()
    )


def test_concept_histograms_count_interpretable_network_dissection_units(first):
    store, run_id = first
    neurons = store.read("neurons", run_id)
    concepts = store.read("summary_concepts", run_id)
    layers = store.read("summary_layers", run_id).set_index("layer")
    categories = store.read("summary_categories", run_id)
    assert sorted(layers.index) == sorted(LAYERS)
    for layer in LAYERS:
        units = neurons[neurons["layer"] == layer]
        interpretable = units[units["interpretable"] == True]  # noqa: E712 - the column holds nulls
        counts = interpretable["concept"].value_counts()
        expected = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:10]
        got = concepts[concepts["layer"] == layer].sort_values("rank")
        assert list(zip(got["concept"], got["units"])) == expected
        assert got["share"].to_numpy() == pytest.approx([n / len(units) for _, n in expected])
        assert layers.loc[layer, "units"] == len(units)
        assert layers.loc[layer, "interpretable"] == len(interpretable)
        shares = categories.loc[categories["layer"] == layer, "share"].sum()
        assert shares == pytest.approx(layers.loc[layer, "interpretable_share"])
    assert layers["interpretable"].sum() > 0, "the tiny model should have some units over the IoU threshold"


def test_best_and_worst_images_and_classes_follow_mean_iou(first):
    store, run_id = first
    per_image = store.read("agreement", run_id).groupby("image_id")["iou"].mean()
    images = store.read("summary_images", run_id).set_index("image_id")
    assert images.loc[per_image.idxmax(), "rank"] == 1
    assert images.loc[per_image.idxmin(), "rank"] == len(per_image)
    assert images["iou_mean"].to_dict() == pytest.approx(per_image.to_dict())
    saliency = (
        store.dataset("saliency", run_id)
        .to_table(columns=["image_id", "target"])
        .to_pandas()
        .drop_duplicates("image_id")
    )
    classes = store.read("summary_classes", run_id).set_index("target")
    for target, rows in saliency.groupby("target"):
        assert classes.loc[target, "images"] == len(rows)
        assert classes.loc[target, "iou_mean"] == pytest.approx(per_image[rows["image_id"]].mean())


def test_lime_search_summary_equals_the_trials(first):
    store, run_id = first
    trials = store.read("lime_trials", run_id)
    best = store.read("summary_lime_best", run_id).set_index("image_id")
    chosen = trials[trials["best"] == True].set_index("image_id")  # noqa: E712
    assert sorted(best.index) == sorted(chosen.index) and len(best) == N_IMAGES
    assert (best["params_json"] == chosen.loc[best.index, "params_json"]).all()
    params = store.read("summary_lime_params", run_id).set_index("params_json")
    means = trials.groupby("params_json")["objective"].mean()
    assert params["objective_mean"].to_dict() == pytest.approx(means.to_dict())
    assert (
        params["wins"].to_dict() == chosen["params_json"].value_counts().reindex(params.index, fill_value=0).to_dict()
    )
    assert params.index[params["rank"] == 1][0] == means.idxmin()
    stability = [json.loads(text)["stability"] for text in trials["components_json"]]
    assert params["stability_mean"].to_dict() == pytest.approx(
        trials.assign(s=stability).groupby("params_json")["s"].mean().to_dict(), nan_ok=True
    )


def test_resummarizing_replaces_the_files(first, capsys):
    store, run_id = first
    before = {table: store.read(table, run_id) for table in RUN_SUMMARY_TABLES}
    assert main(["summarize", run_id, "--results", store.root]) == 0
    assert "summary_pairs" in capsys.readouterr().out
    for table in RUN_SUMMARY_TABLES:
        assert len(store.files(table, run_id)) == 1
        after = store.read(table, run_id)
        pd.testing.assert_frame_equal(after, before[table], check_dtype=False)


def test_summarize_of_an_unknown_run_is_a_usage_error(tmp_path, capsys):
    assert main(["summarize", "no-such-run", "--results", str(tmp_path)]) == 2
    assert "no-such-run" in capsys.readouterr().err


def test_a_run_without_rows_gets_empty_summary_tables(tmp_path):
    store = ResultsStore(tmp_path)
    RunRecord(run_id="empty", config_name="c", config_json="{}", config_hash="h", device="cpu").save(store)
    counts = summarize_run(store, "empty")
    assert counts == {table: 0 for table in RUN_SUMMARY_TABLES}
    for table in RUN_SUMMARY_TABLES:
        assert store.read(table, "empty").columns.tolist() == SUMMARY_TABLES[table].names


def _unit(model, layer, unit, method, concept, category="color", score=0.1, interpretable=None):
    return {
        "model": model,
        "layer": layer,
        "unit": unit,
        "method": method,
        "concept": concept,
        "category": category,
        "score": score,
        "interpretable": interpretable,
    }


def _inputs(neurons: list[dict]) -> dict[str, pd.DataFrame]:
    empty = {
        table: pd.DataFrame(columns=columns)
        for table, columns in {
            "predictions": ["model", "image_id", "label", "label_name", "topk", "true_label"],
            "saliency": ["model", "image_id", "method", "target"],
            "agreement": ["model", "image_id", "method_a", "method_b", "iou", "spearman", "com_distance"],
            "localization": ["model", "image_id", "method", "pointing_hit", "iou_gt", "energy_in_gt"],
            "faithfulness": ["model", "image_id", "method", "deletion_auc", "insertion_auc"],
            "lime_trials": ["model", "image_id", "params_json", "objective", "seconds", "components_json", "best"],
        }.items()
    }
    return {**empty, "neurons": pd.DataFrame(neurons)}


def test_label_agreement_and_unique_concepts_on_known_labels():
    """4 units labelled by both methods; 3 agree (one only up to case), 2 of them interpretable."""
    labels = [("red", "red", True), ("Striped", "striped", True), ("circle", "circle", False), ("blue", "square", True)]
    neurons = []
    for unit, (clip, net, interpretable) in enumerate(labels):
        neurons += [
            _unit("a", "layer4", unit, "clip_dissect", clip),
            _unit("a", "layer4", unit, "netdissect", net, interpretable=interpretable),
        ]
    neurons += [
        _unit("b", "layer4", 0, "clip_dissect", "red"),
        _unit("b", "layer4", 1, "clip_dissect", "sky", category=None),
    ]
    tables = summary_tables(_inputs(neurons))
    (row,) = tables["summary_label_agreement"].to_dict("records")
    assert (row["model"], row["units"], row["agreeing"], row["rate"]) == ("a", 4, 3, 0.75)
    assert (row["interpretable_units"], row["interpretable_agreeing"], row["interpretable_rate"]) == (
        3,
        2,
        pytest.approx(2 / 3),
    )
    scope = tables["summary_concept_models"].set_index(["model", "method", "concept"])["scope"]
    assert scope[("a", "clip_dissect", "red")] == scope[("b", "clip_dissect", "red")] == "shared"
    assert scope[("b", "clip_dissect", "sky")] == scope[("a", "clip_dissect", "blue")] == "unique"
    # the non-interpretable netdissect unit (circle) counts for no concept
    assert ("a", "netdissect", "circle") not in scope.index
    layers = tables["summary_layers"].set_index(["model", "method"])
    assert layers.loc[("a", "netdissect"), ["units", "counted", "interpretable"]].tolist() == [4, 3, 3]
    assert pd.isna(layers.loc[("a", "clip_dissect"), "interpretable"])
    categories = tables["summary_categories"].set_index(["model", "method", "category"])
    assert categories.loc[("b", "clip_dissect", "uncategorized"), "share"] == 0.5


def test_concept_histograms_keep_the_top_n_by_count():
    neurons = [_unit("m", "l", unit, "clip_dissect", concept) for unit, concept in enumerate("aaabbcdd")]
    concepts = summary_tables(_inputs(neurons), top_n=2)["summary_concepts"]
    assert list(zip(concepts["concept"], concepts["units"], concepts["rank"])) == [("a", 3, 1), ("b", 2, 2)]


def test_road_mean_averages_the_stored_road_scores_and_stays_null_without_them():
    saliency = pd.DataFrame(
        {"model": "m", "image_id": ["a", "b", "a", "b"], "method": ["gradcam", "gradcam", "lime", "lime"], "target": 0}
    )
    faithfulness = pd.DataFrame(
        {
            "model": "m",
            "image_id": ["a", "b", "a", "b"],
            "method": ["gradcam", "gradcam", "lime", "lime"],
            "deletion_auc": [0.2, 0.4, 0.3, 0.5],
            "insertion_auc": [0.6, 0.8, 0.5, 0.7],
            "road": [0.25, -0.05, None, None],
        }
    )  # ROAD scores CAM maps only
    empty = pd.DataFrame()
    methods = method_leaderboard(saliency, empty, empty, faithfulness).set_index("method")
    assert methods.loc["gradcam", "road_mean"] == pytest.approx(0.1)
    assert pd.isna(methods.loc["lime", "road_mean"])
    assert {*methods.columns, "method", "run_id"} == set(SUMMARY_TABLES["summary_methods"].names)


class _Blur(Metric):
    """A toy metric without a table of its own: it writes ``scores`` rows, lower is better."""

    name = "toy_blur"
    category = "toy"
    scores = (Score("blur", "blur", "lower", "toy blur"),)

    def rows(self, batch):
        return {self.table: []}


@pytest.fixture
def toy_metric():
    metric = register(_Blur())
    try:
        yield metric
    finally:
        unregister(metric)


def test_a_registered_metrics_scores_reach_the_leaderboards_with_its_direction(toy_metric, tmp_path, monkeypatch):
    store = ResultsStore(tmp_path)
    RunRecord(run_id="toy", config_name="c", config_json="{}", config_hash="h", device="cpu").save(store)
    methods = ["gradcam", "lime"]
    blank = np.zeros(4, np.float16).tobytes()
    store.write(
        "saliency",
        "toy",
        "chunk-0",
        [
            {"model": "m", "image_id": image, "method": method, "target": 0, "height": 2, "width": 2, "map": blank}
            for image in ("a", "b")
            for method in methods
        ],
    )
    blur = {("gradcam", "a"): 0.2, ("gradcam", "b"): 0.6, ("lime", "a"): 0.9, ("lime", "b"): None}
    rows = [
        {"model": "m", "image_id": image, "method": method, "metric": "blur", "value": value}
        for (method, image), value in blur.items()
    ]
    # a value no registered metric declares still gets its mean, without an arrow
    rows.append({"model": "m", "image_id": "a", "method": "lime", "metric": "mystery", "value": 3.0})
    store.write("scores", "toy", "chunk-0", rows)
    summarize_run(store, "toy")

    written = store.read("summary_methods", "toy").set_index("method")
    assert score_map(written.loc["gradcam", "scores"]) == pytest.approx({"blur": 0.4})
    # lime's null blur value is skipped, not averaged as 0
    assert score_map(written.loc["lime", "scores"]) == pytest.approx({"blur": 0.9, "mystery": 3.0})

    table = leaderboard_table(written.reset_index())
    assert {"blur ↓", "mystery", "deletion_auc_mean ↓", "insertion_auc_mean ↑", "faithfulness ↑"} <= {*table.columns}
    assert "scores" not in table.columns
    assert "<th>blur ↓</th>" in Path(write_report(store, "toy")).read_text()

    drawn = []
    monkeypatch.setattr(figures, "_save", lambda figure, path: drawn.append(figure) or path)
    figures.leaderboard(written.reset_index(), tmp_path / "leaderboard.png")
    titles = [ax.get_title() for ax in drawn[0].axes]
    assert titles == ["m: toy blur ↓", "m: mystery"], "only the scores keys have values in this run"


def test_a_run_without_scores_rows_has_no_scores_map():
    saliency = pd.DataFrame({"model": "m", "image_id": ["a", "b"], "method": "gradcam", "target": 0})
    empty = pd.DataFrame()
    no_scores = pd.DataFrame(columns=["model", "image_id", "method", "metric", "value"])
    methods = method_leaderboard(saliency, empty, empty, empty, no_scores)
    assert score_map(methods.loc[0, "scores"]) == {} and pd.isna(methods.loc[0, "scores"])
