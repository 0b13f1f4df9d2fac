"""Target 8: how fast the command line answers before any work.

``xai-audit --help`` and ``xai-audit validate`` of a config with a schema error and of one naming
an unknown method, each in a fresh interpreter (``python -m xai_audit.flows.cli``, wall seconds, median of
the rounds): they import neither torch, Prefect nor open_clip (xai_audit.tasks.core.names), so the goal is
under 1 s. ``validate`` of the valid demo config is reported too: it builds the models on the meta
device and reads the sets, so it pays the heavy imports.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import Result

TARGETS = (
    "8 validate on a bad config (schema error)",
    "8 validate on a bad config (unknown method)",
    "8 --help",
    "8 validate on a valid config (demo)",
)

REPO = Path(__file__).resolve().parents[1]
ROUNDS = {"tiny": 1, "cpu": 5, "gpu": 3}
GOAL_S = 1.0
BAD_CONFIGS = {"schema error": "seed: abc\n", "unknown method": "explain:\n  methods: [gradcam, telepathy]\n"}


def cli_seconds(args: list[str], expected_code: int, rounds: int, python: list[str] | None = None) -> list[float]:
    """Wall seconds of ``python -m xai_audit.flows.cli ARGS`` (or ``python PYTHON``) in a fresh interpreter,
    ``rounds`` times."""
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, *(python or ["-m", "xai_audit.flows.cli", *args])],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        seconds.append(time.perf_counter() - started)
        if done.returncode != expected_code:
            raise RuntimeError(f"xai-audit {' '.join(args)} exited {done.returncode}: {done.stderr[-500:]}")
    return seconds


def _result(target: str, seconds: list[float], goal: float | None, note: str, **extra) -> Result:
    return Result(
        target,
        round(statistics.median(seconds), 2),
        goal,
        "max",
        "s",
        note=f"{note}; median of {len(seconds)} fresh interpreters; load {[round(x, 2) for x in os.getloadavg()]}",
        extra={"seconds": [round(s, 2) for s in seconds], **extra},
    )


def run(size: str) -> list[Result]:
    rounds = ROUNDS[size]
    # what the same machine, at the same load, pays for an empty interpreter and for importing torch
    reference = {
        "bare_python_s": round(statistics.median(cli_seconds([], 0, rounds, ["-c", "pass"])), 2),
        "import_torch_s": round(statistics.median(cli_seconds([], 0, rounds, ["-c", "import torch"])), 2),
    }
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-start-") as folder:
        for kind, text in BAD_CONFIGS.items():
            path = Path(folder) / f"{kind.replace(' ', '-')}.yaml"
            path.write_text(text)
            seconds = cli_seconds(["validate", str(path)], 2, rounds)
            results.append(
                _result(f"8 validate on a bad config ({kind})", seconds, GOAL_S, "exit 2 naming the field", **reference)
            )
    results.append(_result("8 --help", cli_seconds(["--help"], 0, rounds), GOAL_S, "the command list", **reference))
    valid = cli_seconds(["validate", str(REPO / "configs" / "demo.yaml")], 0, rounds)
    results.append(_result("8 validate on a valid config (demo)", valid, None, "models on the meta device, sets read"))
    return results
