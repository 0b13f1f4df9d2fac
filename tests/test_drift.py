"""Drift between runs: changed units and metric deltas checked against the raw tables of both runs,
the automatic comparison with the previous completed run, and the ``diff`` command."""

from __future__ import annotations

import io
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest

from tests.fixtures.audit_runs import two_audited_runs
from xai_audit.flows.cli import main
from xai_audit.storage.parquet import ResultsStore
from xai_audit.storage.runs import RunRecord
from xai_audit.tasks.results.drift import previous_run


@pytest.fixture(scope="module")
def runs(prefect_harness, tmp_path_factory):
    return two_audited_runs(tmp_path_factory)


def changed_units_by_pandas(store: ResultsStore, before: str, after: str) -> pd.DataFrame:
    key = ["model", "layer", "method", "unit"]
    both = store.read("neurons", before)[key + ["concept"]].merge(
        store.read("neurons", after)[key + ["concept"]], on=key
    )
    both["changed"] = both["concept_x"] != both["concept_y"]
    return both.groupby(["model", "layer", "method"]).agg(units=("unit", "size"), changed=("changed", "sum"))


def test_a_run_is_compared_with_the_previous_completed_run_of_its_config(runs):
    store = runs.store
    first, second = runs.first.run_id, runs.second.run_id
    assert runs.first.status == runs.second.status == "completed"
    assert store.read("summary_drift_layers", first).empty, "the first run has nothing to compare with"
    layers = store.read("summary_drift_layers", second)
    assert set(layers["baseline_run_id"]) == {first}
    expected = changed_units_by_pandas(store, first, second)
    got = layers.set_index(["model", "layer", "method"])[["units", "changed"]]
    pd.testing.assert_frame_equal(got.sort_index(), expected.sort_index(), check_dtype=False)
    assert got["changed"].sum() > 0, "a different probe set must move some Network Dissection labels"
    changed = store.read("summary_drift_units", second)
    assert len(changed) == got["changed"].sum()
    assert (changed["concept_before"] != changed["concept_after"]).all()


def test_histogram_and_metric_deltas_equal_after_minus_before(runs):
    store = runs.store
    first, second = runs.first.run_id, runs.second.run_id
    concepts = store.read("summary_drift_concepts", second).set_index(["layer", "concept"])
    for run_id, column in ((first, "units_before"), (second, "units_after")):
        neurons = store.read("neurons", run_id)
        counts = neurons[neurons["interpretable"] == True].groupby(["layer", "concept"]).size()  # noqa: E712
        assert concepts[column].to_dict() == counts.reindex(concepts.index, fill_value=0).to_dict()
    assert (concepts["delta"] == concepts["units_after"] - concepts["units_before"]).all() and (
        concepts["delta"] != 0
    ).all()
    metrics = store.read("summary_drift_metrics", second).set_index(["subject", "metric"])
    pair_iou = {
        run_id: store.read("agreement", run_id).query("method_a == 'gradcam' and method_b == 'lime'")["iou"].mean()
        for run_id in (first, second)
    }
    row = metrics.loc[("gradcam vs lime", "iou_mean")]
    assert (row["before"], row["after"]) == (pytest.approx(pair_iou[first]), pytest.approx(pair_iou[second]))
    assert row["delta"] == pytest.approx(pair_iou[second] - pair_iou[first])
    assert row["delta"] != 0, "LIME with another seed on other images must change the agreement"
    deletion = {
        run_id: store.read("faithfulness", run_id).query("method == 'lime'")["deletion_auc"].mean()
        for run_id in (first, second)
    }
    assert metrics.loc[("lime", "deletion_auc_mean"), "delta"] == pytest.approx(deletion[second] - deletion[first])


def test_diff_command_prints_changed_units_and_writes_a_figure(runs, tmp_path, capsys):
    store = runs.store
    first, second = runs.first.run_id, runs.second.run_id
    figure = tmp_path / "drift.png"
    assert main(["diff", first, second, "--results", store.root, "--format", "csv", "--figure", str(figure)]) == 0
    printed = capsys.readouterr()
    table = pd.read_csv(io.StringIO(printed.out)).set_index(["model", "layer", "method"])
    expected = changed_units_by_pandas(store, first, second)
    assert table["changed"].to_dict() == expected["changed"].to_dict()
    assert f"figure: {figure}" in printed.err
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the reverse comparison is its own drift, filed under the first run (in a copy: other tests
    # rely on the first run having none)
    copy = ResultsStore(shutil.copytree(store.root, tmp_path / "copy"))
    assert main(["diff", second, first, "--results", copy.root]) == 0
    reverse = copy.read("summary_drift_layers", first)
    assert set(reverse["baseline_run_id"]) == {second} and reverse["changed"].sum() == table["changed"].sum()
    assert (Path(copy.root) / "reports" / "drift" / f"{first}-vs-{second}.png").is_file()


def test_diff_with_an_unknown_run_is_a_usage_error(runs, capsys):
    assert main(["diff", runs.first.run_id, "no-such-run", "--results", runs.store.root]) == 2
    assert "no-such-run" in capsys.readouterr().err


def test_previous_run_is_the_latest_earlier_completed_run_of_the_same_name(tmp_path):
    store = ResultsStore(tmp_path)
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)

    def save(run_id: str, minutes: int, status: str = "completed", name: str = "nightly") -> None:
        record = RunRecord(
            run_id=run_id,
            config_name=name,
            config_json="{}",
            config_hash="h",
            device="cpu",
            started_at=start + timedelta(minutes=minutes),
        )
        record.status = status
        record.save(store)

    save("old", 0)
    save("good", 10)
    save("broken", 20, status="failed")
    save("partial", 25, status="partial")
    save("other", 30, name="weekly")
    save("now", 40, status="running")
    save("later", 50)
    assert previous_run(store, "now") == "good"
    assert previous_run(store, "good") == "old"
    assert previous_run(store, "old") is None
    assert previous_run(store, "other") is None
