"""Whether two results roots hold the same tables, up to run ids and timings.

Used to show that a refactor changes no result: run the same config on the commit before and
after (same ``XAI_AUDIT_CACHE``, so both audit the same trained models), then

    python -m benchmarks.compare_tables RESULTS_BEFORE RESULTS_AFTER

Every table folder of either root is read with pyarrow (all runs, ``run_id`` dropped), its rows
sorted by every column, and compared value by value: exactly, or within ``--tolerance``
(relative, for floats). Columns that hold wall times, paths under a root, or the run's own
bookkeeping are left out (:data:`IGNORED`). Exit status 1 when any table differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

IGNORED: dict[str, set[str]] = {
    "*": {"run_id"},
    "runs": {
        "started_at",
        "finished_at",
        "timings_json",
        "pid",
        "hostname",
        "config_json",
        "config_hash",
        "versions",
        "message",
        "timings",
    },
    "lime_trials": {"seconds"},
    "summary_lime_params": {"seconds_mean"},
    "summary_lime_best": {"seconds"},
    "images": {"path", "mask_path"},
}
"""Columns that differ between two runs of one config by nature, per table."""


def read_table(root: Path, table: str) -> pd.DataFrame:
    """Every row of ``table`` under ``root`` without the ignored columns, in a canonical order."""
    folder = root / table
    if not folder.is_dir():
        return pd.DataFrame()
    frame = ds.dataset(folder, format="parquet", partitioning="hive").to_table().to_pandas()
    frame = frame.drop(columns=[c for c in frame.columns if c in IGNORED["*"] | IGNORED.get(table, set())])
    keys = [
        c for c in frame.columns if frame[c].map(lambda v: isinstance(v, (str, int, float, bool, type(None)))).all()
    ]
    return frame.sort_values(keys, kind="mergesort").reset_index(drop=True) if keys else frame


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and bool(np.isnan(value)))


def _equal(a: object, b: object, tolerance: float) -> bool:
    """Equal values; floats (numpy's too) within ``tolerance`` relative; nulls and NaNs equal each other."""
    if isinstance(a, (list, tuple, np.ndarray)) and isinstance(b, (list, tuple, np.ndarray)):
        return len(a) == len(b) and all(_equal(x, y, tolerance) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k], tolerance) for k in a)
    missing_a, missing_b = _missing(a), _missing(b)
    if missing_a or missing_b:
        return missing_a and missing_b
    if isinstance(a, (float, np.floating)) and isinstance(b, (float, np.floating)):
        return a == b or abs(float(a) - float(b)) <= tolerance * max(abs(float(a)), abs(float(b)))
    return a == b


def compare(before: Path, after: Path, tolerance: float = 0.0) -> list[tuple[str, str]]:
    """``(table, verdict)`` for every table folder of either root."""
    tables = sorted({p.name for p in before.iterdir() if p.is_dir()} | {p.name for p in after.iterdir() if p.is_dir()})
    verdicts = []
    for table in tables:
        if table == "reports":
            continue
        left, right = read_table(before, table), read_table(after, table)
        if left.empty and right.empty:
            verdicts.append((table, "identical (empty in both)"))
            continue
        if list(left.columns) != list(right.columns):
            extra, missing = (
                sorted(set(right.columns) - set(left.columns)),
                sorted(set(left.columns) - set(right.columns)),
            )
            shared = [c for c in left.columns if c in right.columns]
            note = f"columns added {extra} removed {missing}; "
            left, right = left[shared], right[shared]
        else:
            note = ""
        if len(left) != len(right):
            verdicts.append((table, f"{note}DIFFERENT: {len(left)} vs {len(right)} rows"))
            continue
        bad = [
            (i, c)
            for c in left.columns
            for i in range(len(left))
            if not _equal(left.at[i, c], right.at[i, c], tolerance)
        ]
        if bad:
            i, c = bad[0]
            verdicts.append(
                (
                    table,
                    f"{note}DIFFERENT: {len(bad)} value(s), first row {i} column {c}: "
                    f"{left.at[i, c]!r} vs {right.at[i, c]!r}",
                )
            )
        else:
            verdicts.append((table, f"{note}identical ({len(left)} rows, {len(left.columns)} columns)"))
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="results root of the reference run")
    parser.add_argument("after", type=Path, help="results root of the run to check")
    parser.add_argument("--tolerance", type=float, default=0.0, help="relative tolerance for floats (default: exact)")
    args = parser.parse_args(argv)
    verdicts = compare(args.before, args.after, args.tolerance)
    for table, verdict in verdicts:
        print(f"{table:28s} {verdict}")
    return 1 if any("DIFFERENT" in verdict for _, verdict in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
