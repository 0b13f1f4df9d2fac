"""The table comparison that shows a refactor changed no result must notice a changed value."""

from __future__ import annotations

from benchmarks.compare_tables import compare
from xai_audit.storage.parquet import ResultsStore


def _write(root, iou: float, run_id: str) -> None:
    rows = [
        {
            "model": "m",
            "image_id": f"img{i}.png",
            "method_a": "gradcam",
            "method_b": "lime",
            "target": 1,
            "iou": iou if i else 0.5,
            "spearman": 0.1 * i,
            "com_distance": 0.0,
            "rule": "top_q",
            "q": 0.2,
        }
        for i in range(3)
    ]
    ResultsStore(str(root)).write("agreement", run_id, "chunk0", rows[::-1] if run_id == "b" else rows)


def test_same_rows_in_another_order_and_run_are_identical(tmp_path):
    _write(tmp_path / "left", 0.25, "a")
    _write(tmp_path / "right", 0.25, "b")
    assert compare(tmp_path / "left", tmp_path / "right") == [("agreement", "identical (3 rows, 10 columns)")]


def test_one_changed_value_is_reported(tmp_path):
    _write(tmp_path / "left", 0.25, "a")
    _write(tmp_path / "right", 0.25 + 1e-6, "a")  # iou is float32: one step is ~3e-8 here
    ((table, verdict),) = compare(tmp_path / "left", tmp_path / "right")
    assert table == "agreement" and verdict.startswith("DIFFERENT: 2 value(s)")
    assert compare(tmp_path / "left", tmp_path / "right", tolerance=1e-4)[0][1].startswith("identical")
