"""The Prefect artifacts of a run: a markdown summary and tables, built from the summary tables.

Keys are stable (``xai-audit-summary``, ``xai-audit-concepts``, ...), so Prefect's UI shows each
key's history across runs. This module only builds their contents (plain data, testable without
Prefect); :func:`xai_audit.tasks.results.tasks.publish_artifacts` hands them to Prefect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from xai_audit.storage.parquet import ResultsStore
from xai_audit.tasks.results.drift import read_drift
from xai_audit.tasks.results.findings import findings, method_marks
from xai_audit.tasks.results.summary import declared_score, load_summary, raw_counts, score_map

TOP_IN_MARKDOWN = 3
KEYS = {
    "summary": "xai-audit-summary",
    "concepts": "xai-audit-concepts",
    "pairs": "xai-audit-pairs",
    "methods": "xai-audit-methods",
    "drift": "xai-audit-drift",
    "sanity": "xai-audit-sanity",
}
MARKDOWN_METHOD_COLUMNS = ("pointing_accuracy", "deletion_auc_mean", "insertion_auc_mean")
"""The summary_methods columns of the markdown's short methods table (the table artifact has them all)."""


@dataclass(frozen=True)
class Artifact:
    """One artifact to create: a markdown text or the rows of a table."""

    key: str
    description: str
    markdown: str | None = None
    rows: list[dict] | None = None


def _rows(frame: pd.DataFrame) -> list[dict]:
    """Rows Prefect can store as JSON: NaN and NA become None, numbers become plain floats/ints."""
    rows = []
    for record in frame.to_dict("records"):
        clean = {}
        for key, value in record.items():
            if hasattr(value, "item"):
                value = value.item()
            clean[key] = (
                None if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA else value
            )
        rows.append(clean)
    return rows


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def summary_markdown(
    run_id: str,
    counts: dict[str, int],
    summary: dict[str, pd.DataFrame],
    drift: dict[str, dict[str, pd.DataFrame]],
    report_path: str | None,
    errors: pd.DataFrame | None = None,
) -> str:
    """The run's markdown artifact: where the report is, top concepts, IoU statistics, leaderboard, drift."""
    digest = findings(run_id, summary, drift, counts.get("errors", 0), errors)
    lines = [
        f"# xai-audit run `{run_id}`",
        "",
        f"Report: `{report_path}`" if report_path else "Report: not written (see the errors table).",
        "",
        "## Findings",
        "",
        "```",
        *digest[1:],
        "```",
        "",
        "| table | rows |",
        "|---|---:|",
        *[f"| {table} | {rows} |" for table, rows in counts.items()],
        "",
    ]
    concepts = summary["summary_concepts"]
    if not concepts.empty:
        lines += ["## Top concepts per layer", "", "| model | layer | method | concepts (units) |", "|---|---|---|---|"]
        for (model, layer, method), rows in concepts.groupby(["model", "layer", "method"], sort=False):
            top = ", ".join(
                f"{c} ({u})" for c, u in zip(rows["concept"].head(TOP_IN_MARKDOWN), rows["units"].head(TOP_IN_MARKDOWN))
            )
            lines.append(f"| {model} | {layer} | {method} | {top} |")
        lines.append("")
    pairs = summary["summary_pairs"]
    if not pairs.empty:
        lines += [
            "## Agreement (IoU) between methods",
            "",
            "| model | pair | images | mean | median | std | Spearman mean |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r.model} | {r.method_a} vs {r.method_b} | {r.images} | {_number(r.iou_mean)} | "
            f"{_number(r.iou_median)} | {_number(r.iou_std)} | {_number(r.spearman_mean)} |"
            for r in pairs.itertuples()
        ]
        lines.append("")
    methods = summary["summary_methods"]
    if not methods.empty:
        scores = [declared_score(column) for column in MARKDOWN_METHOD_COLUMNS]
        header = " | ".join(f"{score.label} {score.arrow}" for score in scores)
        lines += ["## Methods", "", f"| model | method | {header} |", "|---|---|" + "---:|" * len(scores)]
        for row in methods.to_dict("records"):
            values = " | ".join(_number(row[column]) for column in MARKDOWN_METHOD_COLUMNS)
            lines.append(f"| {row['model']} | {row['method']}{method_marks(row)} | {values} |")
        lines.append("")
    for baseline, tables in drift.items():
        layers = tables["summary_drift_layers"]
        changed, units = (
            int(layers["changed"].sum()) if not layers.empty else 0,
            int(layers["units"].sum()) if not layers.empty else 0,
        )
        lines += [f"## Drift against `{baseline}`", "", f"{changed} of {units} unit(s) changed their top concept.", ""]
    return "\n".join(lines)


def run_artifacts(store: ResultsStore, run_id: str, report_path: str | None) -> list[Artifact]:
    """The run's artifacts: the markdown summary, then each non-empty table."""
    summary, drift = load_summary(store, run_id), read_drift(store, run_id)
    artifacts = [
        Artifact(
            KEYS["summary"],
            f"Summary of xai-audit run {run_id}",
            markdown=summary_markdown(
                run_id, raw_counts(store, run_id), summary, drift, report_path, store.read("errors", run_id)
            ),
        )
    ]
    methods = summary["summary_methods"]
    tables = {
        "concepts": (summary["summary_concepts"], "Concept histograms: top concepts per (model, layer, method)"),
        "pairs": (summary["summary_pairs"], "IoU and Spearman statistics per method pair"),
        # the scores map as a JSON object (Parquet reads it back as (key, value) pairs); null without scores rows
        "methods": (
            methods.assign(scores=[score_map(value) or None for value in methods["scores"]]),
            "Localization and faithfulness leaderboards per method",
        ),
    }
    sanity = summary.get("summary_sanity")
    if sanity is not None:
        tables["sanity"] = (sanity, "Randomisation curves: similarity to the trained model's maps per step")
    if drift:
        tables["drift"] = (
            pd.concat([tables_["summary_drift_layers"] for tables_ in drift.values()]),
            "Units whose top concept changed, per layer",
        )
    artifacts += [
        Artifact(KEYS[name], f"{description} (run {run_id})", rows=_rows(frame))
        for name, (frame, description) in tables.items()
        if not frame.empty
    ]
    return artifacts
