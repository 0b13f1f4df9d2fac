"""The summary stage: reads the run's Parquet tables back (so it can run anywhere, alone)."""
from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from storage.parquet import ResultsStore
from storage.schemas import TABLES


def summarize_run(store: ResultsStore, run_id: str) -> dict[str, int]:
    """Rows per table for one run (``runs`` excluded)."""
    return {table: store.dataset(table, run_id).count_rows() for table in TABLES if table != "runs"}


def counts_markdown(run_id: str, counts: dict[str, int]) -> str:
    lines = [f"# xai-audit run `{run_id}`", "", "| table | rows |", "|---|---:|"]
    lines += [f"| {table} | {rows} |" for table, rows in counts.items()]
    return "\n".join(lines) + "\n"


@task(name="summarize", task_run_name="summarize {run_id}")
def summarize_task(results: str, run_id: str) -> dict[str, int]:
    """Count what the run wrote, log it and publish it as a Prefect artifact."""
    counts = summarize_run(ResultsStore(results), run_id)
    get_run_logger().info("run %s rows: %s", run_id, counts)
    create_markdown_artifact(counts_markdown(run_id, counts), key="xai-audit-summary", description=f"Row counts of run {run_id}")
    return counts
