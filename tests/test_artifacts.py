"""Prefect artifacts of a flow run, read back through the Prefect client of the test harness."""

from __future__ import annotations

import json

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from tests.fixtures.audit_runs import NAME, two_audited_runs
from xai_audit.tasks.results.artifacts import KEYS


@pytest.fixture(scope="module")
def runs(prefect_harness, tmp_path_factory):
    return two_audited_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def artifacts(runs):
    """Every artifact of our keys, with the name of the flow run that made it."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(KEYS.values()))))
        return [(artifact, client.read_flow_run(artifact.flow_run_id).name) for artifact in found]


def of_run(artifacts, key: str, run_id: str):
    """The artifact ``key`` whose description names ``run_id``."""
    (match,) = [
        (artifact, flow_run)
        for artifact, flow_run in artifacts
        if artifact.key == key and run_id in (artifact.description or "")
    ]
    return match


def table_data(artifact) -> list[dict]:
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def test_each_run_publishes_a_markdown_summary_with_its_report_and_top_concepts(runs, artifacts):
    store, run_id = runs.store, runs.second.run_id
    artifact, flow_run = of_run(artifacts, KEYS["summary"], run_id)
    assert artifact.type == "markdown" and flow_run == f"audit {NAME}"
    assert runs.second.report_path in artifact.data
    concepts = store.read("summary_concepts", run_id)
    top = concepts[concepts["rank"] == 1].iloc[0]
    assert f"| {top['model']} | {top['layer']} | {top['method']} | {top['concept']} ({top['units']})" in artifact.data
    pairs = store.read("summary_pairs", run_id).iloc[0]
    assert (
        f"| {pairs['method_a']} vs {pairs['method_b']} | {pairs['images']} | {pairs['iou_mean']:.3f} |" in artifact.data
    )
    assert f"Drift against `{runs.first.run_id}`" in artifact.data
    assert "Drift against" not in of_run(artifacts, KEYS["summary"], runs.first.run_id)[0].data


def test_table_artifacts_hold_the_histograms_and_leaderboards(runs, artifacts):
    store, run_id = runs.store, runs.first.run_id
    for name, table in (("concepts", "summary_concepts"), ("methods", "summary_methods"), ("pairs", "summary_pairs")):
        artifact, _ = of_run(artifacts, KEYS[name], run_id)
        assert artifact.type == "table"
        rows = table_data(artifact)
        expected = store.read(table, run_id).drop(columns="run_id")
        assert len(rows) == len(expected) > 0
        assert [row[expected.columns[-1]] for row in rows] == pytest.approx(expected.iloc[:, -1].tolist(), nan_ok=True)
        assert set(rows[0]) == set(expected.columns)
    drift, _ = of_run(artifacts, KEYS["drift"], runs.second.run_id)
    changed = store.read("summary_drift_layers", runs.second.run_id)
    assert sum(row["changed"] for row in table_data(drift)) == changed["changed"].sum()
