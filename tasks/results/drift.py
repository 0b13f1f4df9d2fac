"""Drift between two runs: which units changed their concept, how histograms and metrics moved.

The later run owns the result: its ``summary_drift_*`` files are named after the baseline
(``vs-<baseline>``), so comparing with another baseline adds files and comparing again replaces
them. Everything is computed from the two runs' tables (summaries computed in memory when absent).
"""

from __future__ import annotations

import pandas as pd

from xai_audit.storage.parquet import ResultsStore
from xai_audit.tasks.results.summary import (
    DRIFT_TABLES,
    counted_units,
    empty_frame,
    load_summary,
    method_scores,
    require_run,
    table_rows,
)

UNIT_KEY = ["model", "layer", "method", "unit"]
LAYER_KEY = ["model", "layer", "method"]
METHOD_METRICS = tuple(score.summary for score in method_scores())
"""The summary_methods columns compared: every registered value with a column, and the derived ones."""
PAIR_METRICS = ("iou_mean", "spearman_mean")


def drift_unit(baseline_run_id: str) -> str:
    """The work-unit name of a run's drift files against ``baseline_run_id``."""
    return f"vs-{baseline_run_id}"


def previous_run(store: ResultsStore, run_id: str) -> str | None:
    """The latest completed run of ``run_id``'s config name that started before it, if any."""
    runs = store.read("runs")
    this = runs[runs["run_id"] == run_id]
    if this.empty:
        return None
    started, name = this["started_at"].iloc[0], this["config_name"].iloc[0]
    earlier = runs[(runs["config_name"] == name) & (runs["status"] == "completed") & (runs["started_at"] < started)]
    return None if earlier.empty else str(earlier.sort_values("started_at")["run_id"].iloc[-1])


def _neurons(store: ResultsStore, run_id: str) -> pd.DataFrame:
    return (
        store.dataset("neurons", run_id)
        .to_table(columns=UNIT_KEY + ["concept", "category", "score", "interpretable"])
        .to_pandas()
    )


def unit_changes(before: pd.DataFrame, after: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-layer counts, changed units) of the units labelled in both runs."""
    both = before.merge(after, on=UNIT_KEY, suffixes=("_before", "_after"))
    if both.empty:
        return empty_frame("summary_drift_layers").drop(columns="baseline_run_id"), empty_frame(
            "summary_drift_units"
        ).drop(columns="baseline_run_id")
    both["changed"] = both["concept_before"].ne(both["concept_after"])
    layers = both.groupby(LAYER_KEY).agg(units=("unit", "size"), changed=("changed", "sum")).reset_index()
    layers["changed_share"] = layers["changed"] / layers["units"]
    units = both[both["changed"]].sort_values(UNIT_KEY)
    return layers, units[UNIT_KEY + ["concept_before", "concept_after", "score_before", "score_after"]]


def histogram_deltas(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """Counted units per (model, layer, method, concept) in both runs, where the count changed."""
    key = LAYER_KEY + ["concept"]
    counts = (
        pd.concat(
            [
                counted_units(before).groupby(key).size().rename("units_before"),
                counted_units(after).groupby(key).size().rename("units_after"),
            ],
            axis=1,
        )
        .fillna(0)
        .astype(int)
    )
    counts["delta"] = counts["units_after"] - counts["units_before"]
    counts = counts[counts["delta"] != 0].reset_index()
    return (
        counts.sort_values(LAYER_KEY + ["delta", "concept"], ascending=[True, True, True, False, True])
        if not counts.empty
        else counts
    )


def _long_metrics(summary: dict[str, pd.DataFrame], value: str) -> pd.DataFrame:
    methods, pairs = summary["summary_methods"], summary["summary_pairs"]
    parts = []
    if not methods.empty:
        parts.append(
            methods.melt(
                id_vars=["model", "method"], value_vars=list(METHOD_METRICS), var_name="metric", value_name=value
            ).rename(columns={"method": "subject"})
        )
    if not pairs.empty:
        pairs = pairs.assign(subject=pairs["method_a"] + " vs " + pairs["method_b"])
        parts.append(
            pairs.melt(id_vars=["model", "subject"], value_vars=list(PAIR_METRICS), var_name="metric", value_name=value)
        )
    return pd.concat(parts) if parts else pd.DataFrame(columns=["model", "subject", "metric", value])


def metric_deltas(before: dict[str, pd.DataFrame], after: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Each method's and method pair's summary metrics in both runs, and their difference."""
    frame = _long_metrics(before, "before").merge(
        _long_metrics(after, "after"), on=["model", "subject", "metric"], how="outer"
    )
    frame = frame.dropna(subset=["before", "after"], how="all")
    frame["before"], frame["after"] = frame["before"].astype(float), frame["after"].astype(float)
    frame["delta"] = frame["after"] - frame["before"]
    return frame.sort_values(["model", "subject", "metric"])


def class_concept_deltas(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """Each (model, method, layer, class, concept) mean share in both runs, where it changed; a
    concept absent from a class that both runs attributed counts as share 0."""
    key = ["model", "method", "layer", "class_name", "concept"]
    columns = key + ["share_before", "share_after", "delta"]
    if before.empty and after.empty:
        return pd.DataFrame(columns=columns)
    frame = before[key + ["share_mean"]].merge(
        after[key + ["share_mean"]], on=key, how="outer", suffixes=("_before", "_after")
    )
    classes = ["model", "method", "layer", "class_name"]
    in_both = (
        frame[classes]
        .apply(tuple, axis=1)
        .isin(set(before[classes].apply(tuple, axis=1)) & set(after[classes].apply(tuple, axis=1)))
    )
    frame = frame[in_both].fillna({"share_mean_before": 0.0, "share_mean_after": 0.0})
    frame = frame.rename(columns={"share_mean_before": "share_before", "share_mean_after": "share_after"})
    frame["delta"] = frame["share_after"] - frame["share_before"]
    return frame.loc[frame["delta"] != 0, columns].sort_values(key)


def drift_tables(store: ResultsStore, baseline_run_id: str, run_id: str) -> dict[str, pd.DataFrame]:
    """Every ``summary_drift_*`` table of ``run_id`` against ``baseline_run_id``."""
    for run in (baseline_run_id, run_id):
        require_run(store, run)
    before, after = _neurons(store, baseline_run_id), _neurons(store, run_id)
    layers, units = unit_changes(before, after)
    summary_before, summary_after = load_summary(store, baseline_run_id), load_summary(store, run_id)
    tables = {
        "summary_drift_layers": layers,
        "summary_drift_units": units,
        "summary_drift_concepts": histogram_deltas(before, after),
        "summary_drift_metrics": metric_deltas(summary_before, summary_after),
        "summary_drift_class_concepts": class_concept_deltas(
            summary_before["summary_class_concepts"], summary_after["summary_class_concepts"]
        ),
    }
    return {
        table: frame.assign(baseline_run_id=baseline_run_id)
        .reindex(columns=empty_frame(table).columns)
        .reset_index(drop=True)
        for table, frame in tables.items()
    }


def write_drift(store: ResultsStore, baseline_run_id: str, run_id: str) -> dict[str, pd.DataFrame]:
    """Compute and write ``run_id``'s drift against ``baseline_run_id``; returns the tables."""
    tables = drift_tables(store, baseline_run_id, run_id)
    for table, frame in tables.items():
        store.write(table, run_id, drift_unit(baseline_run_id), table_rows(frame))
    return tables


def read_drift(store: ResultsStore, run_id: str) -> dict[str, dict[str, pd.DataFrame]]:
    """Every drift written for ``run_id``, by baseline run id."""
    frames = {table: store.read(table, run_id) for table in DRIFT_TABLES}
    baselines = sorted(set().union(*(set(frame["baseline_run_id"].dropna()) for frame in frames.values())))
    return {
        baseline: {
            table: frame[frame["baseline_run_id"] == baseline].drop(columns="run_id").reset_index(drop=True)
            for table, frame in frames.items()
        }
        for baseline in baselines
    }
