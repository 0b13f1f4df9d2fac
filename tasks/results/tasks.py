"""The summary stage as a Prefect task: summary tables, drift, report and artifacts of one run.

The only module of :mod:`xai_audit.tasks.results` that imports Prefect; everything it calls is plain code
that tests and ``xai-audit summarize/report/diff`` use directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from xai_audit.storage.parquet import ResultsStore
from xai_audit.tasks.core.progress import step
from xai_audit.tasks.results.artifacts import run_artifacts
from xai_audit.tasks.results.drift import previous_run, write_drift
from xai_audit.tasks.results.report import write_report
from xai_audit.tasks.results.summary import summarize_run


@dataclass(frozen=True)
class RunSummary:
    """What the summary stage hands back to the flow."""

    n_errors: int
    report_path: str | None
    baseline_run_id: str | None


def publish_artifacts(store: ResultsStore, run_id: str, report_path: str | None) -> list[str]:
    """Create the run's artifacts (:func:`xai_audit.tasks.results.artifacts.run_artifacts`) in the current
    flow or task run; returns the keys created."""
    created = []
    for artifact in run_artifacts(store, run_id, report_path):
        if artifact.markdown is not None:
            create_markdown_artifact(artifact.markdown, key=artifact.key, description=artifact.description)
        else:
            create_table_artifact(artifact.rows, key=artifact.key, description=artifact.description)
        created.append(artifact.key)
    return created


@task(name="summarize", task_run_name="summarize {run_id}")
def summarize_task(results: str, run_id: str) -> RunSummary:
    """Summary tables, drift against the previous completed run of the config, report, artifacts.

    A report that cannot be written becomes an ``errors`` row (stage ``report``): the run's
    tables are complete, and ``xai-audit report RUN_ID`` can write it again later.
    """
    logger = get_run_logger()
    store = ResultsStore(results)
    step("summary of run %s: tables, drift, report", run_id)
    counts = summarize_run(store, run_id)
    logger.info("run %s summary rows: %s", run_id, counts)
    baseline = previous_run(store, run_id)
    if baseline:
        changed = write_drift(store, baseline, run_id)["summary_drift_units"]
        logger.info("run %s vs previous run %s: %d unit(s) changed their top concept", run_id, baseline, len(changed))
    report_path, errors = None, []
    try:
        report_path = write_report(store, run_id)
        logger.info("report: %s", report_path)
    except Exception as error:  # noqa: BLE001 - a failed report must not lose the run's tables
        logger.error("report of run %s failed: %s: %s", run_id, type(error).__name__, error)
        errors.append({"stage": "report", "item_id": run_id, "error_type": type(error).__name__, "message": str(error)})
    store.write("errors", run_id, "report", errors)
    publish_artifacts(store, run_id, report_path)
    return RunSummary(store.dataset("errors", run_id).count_rows(), report_path, baseline)
