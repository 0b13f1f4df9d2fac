"""The benchmark suite runs end to end at its tiny size and checks correctness in the same run.

Benchmarks are not tests: nothing here looks at a time or a ratio's value, only that every
target was measured, the results were written, and the side-by-side outputs agreed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The targets 1-4 (benchmarks of other targets add their own rows).
REQUIRED = {
    "1 LIME fp32 speed-up",
    "1 LIME mixed-precision speed-up",
    "1 LIME fp32 overhead over the model",
    "1 LIME mixed-precision overhead over the model",
    "2 ScoreCAM fp32 speed-up",
    "2 AblationCAM fp32 speed-up",
    "2 ScoreCAM mixed-precision speed-up",
    "2 AblationCAM mixed-precision speed-up",
    "3 gradient CAM family speed-up",
    "4 CLIP-Dissect soft_wpmi speed-up",
    "4 CLIP-Dissect soft_wpmi peak RSS",
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, str]:
    folder = tmp_path_factory.mktemp("bench")
    out, markdown = folder / "run.json", folder / "RESULTS.md"
    markdown.write_text("# Results\n\nhand-written notes stay\n")
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--size", "tiny", "--out", str(out), "--markdown", str(markdown)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        # a Prefect home of its own: the user's ~/.prefect database may be migrated by another Prefect version
        env={**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_HOME": str(folder / "prefect-home")},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(out.read_text()), markdown.read_text()


def test_every_benchmark_runs_and_every_target_is_measured(tiny_run):
    run, _ = tiny_run
    modules = {path.stem.removeprefix("bench_") for path in (ROOT / "benchmarks").glob("bench_*.py")}
    assert modules == set(run["benchmarks"])
    by_target = {r["target"]: r for r in run["results"]}
    assert REQUIRED <= set(by_target)
    for target, result in by_target.items():
        assert result["status"] != "error", f"{target}: {result['note']}"
        if result["status"] == "skipped":  # allowed only for other benchmarks, and only with a reason
            assert target not in REQUIRED and result["note"], target
            continue
        assert result["status"] == "ok"
        assert isinstance(result["measured"], float) and result["measured"] > 0
        assert result["met"] in (True, False, None)
        assert (result["met"] is None) == (result["goal"] is None)


def test_machine_is_described(tiny_run):
    machine = tiny_run[0]["machine"]
    assert machine["cores"] >= 1 and machine["ram_gib"] > 0
    assert machine["torch"] and machine["cpu"] and machine["device"].startswith(("cpu", "cuda"))


def test_side_by_side_outputs_agree(tiny_run):
    by_target = {r["target"]: r for r in tiny_run[0]["results"]}
    for target in ("2 ScoreCAM fp32 speed-up", "2 AblationCAM fp32 speed-up", "3 gradient CAM family speed-up"):
        assert by_target[target]["extra"]["maps_identical"] is True, target
    for target in ("2 ScoreCAM mixed-precision speed-up", "2 AblationCAM mixed-precision speed-up"):
        assert by_target[target]["extra"]["pearson_vs_stock_fp32"] >= 0.99, target
    assert by_target["4 CLIP-Dissect soft_wpmi speed-up"]["extra"]["identical_1e-4"] is True
    assert by_target["1 LIME fp32 speed-up"]["extra"]["top5_jaccard_vs_stock_fp32"] >= 0.8
    netdissect = by_target["5 Network Dissection vs NetDissect-Lite reference speed-up"]["extra"]
    # float32 vs Pillow's float64 bilinear weights may flip a pixel within rounding of the threshold
    assert netdissect["same_thresholds_max_abs_iou_diff"] <= 1e-3
    assert netdissect["same_thresholds_same_label_rate"] >= 0.99


def test_results_markdown_gets_a_row_per_target_and_keeps_notes(tiny_run):
    run, markdown = tiny_run
    assert "hand-written notes stay" in markdown
    assert markdown.count("<!-- results:tiny begin") == 1 and "<!-- results:tiny end -->" in markdown
    for result in run["results"]:
        assert f"| {result['target']} |" in markdown
