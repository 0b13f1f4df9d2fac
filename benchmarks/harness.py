"""The shared benchmark harness: machine description, side-by-side timing, result records.

A benchmark module is ``benchmarks/bench_<name>.py`` with ``run(size: str) -> list[Result]``;
the runner (``python -m benchmarks``) finds it by that name, so adding a benchmark touches no
other file. Inside ``run``:

    from benchmarks.harness import Result, compare, device_for, peak_rss_mib

    timing = compare("lime fp32", ours=lambda: ours(x), stock=lambda: stock(x), repeats=3, warmup=1)
    return [Result.speedup("1 LIME fp32", timing, goal=1.3, extra={"top5_jaccard": 1.0})]

``compare`` runs both sides alternately (ours, stock, ours, stock, ...) in this process after
``warmup`` untimed calls of each, so drifting machine load hits both sides alike; the ratio
reported is the median of the per-round ``stock / ours`` ratios. Correctness is checked by the
benchmark itself on the outputs ``compare`` hands back (``timing.ours_output``), and recorded
in ``extra`` (``max_abs_diff``, ``pearson``, ``jaccard``, ``maps_identical`` ...).
``interleave`` does the same for more than two sides (one slow stock run shared by several
of ours). ``Result.skipped`` records a target that could not run and why.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

SIZES = ("tiny", "cpu", "gpu")
"""``tiny``: seconds, for the smoke test; ``cpu``: the issue's CPU targets; ``gpu``: realistic sizes on CUDA."""


@dataclass
class Timing:
    """Both sides' wall times (seconds, one per round) and the last output of each side."""

    name: str
    ours_s: list[float]
    stock_s: list[float]
    ours_output: Any = field(default=None, repr=False)
    stock_output: Any = field(default=None, repr=False)

    @property
    def ratio(self) -> float:
        """Median over rounds of ``stock / ours``: above 1 means ours is faster."""
        return statistics.median(s / o for s, o in zip(self.stock_s, self.ours_s))

    @property
    def ours_median_s(self) -> float:
        return statistics.median(self.ours_s)

    @property
    def stock_median_s(self) -> float:
        return statistics.median(self.stock_s)


def compare(name: str, ours: Callable[[], Any], stock: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> Timing:
    """Time ``ours()`` against ``stock()``, alternating, ``repeats`` rounds after ``warmup`` rounds."""
    runs = interleave({"ours": ours, "stock": stock}, repeats, warmup)
    return Timing(name, runs["ours"][0], runs["stock"][0], runs["ours"][1], runs["stock"][1])


def interleave(
    sides: dict[str, Callable[[], Any]], repeats: int = 3, warmup: int = 1
) -> dict[str, tuple[list[float], Any]]:
    """Each side's wall times over ``repeats`` rounds (every round runs every side once, in
    order) and its last output: ``{side: (seconds, output)}``. For more than two sides sharing
    one expensive reference; ``Timing(name, a[0], b[0], a[1], b[1])`` pairs any two of them."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    outputs = {side: None for side in sides}
    for _ in range(warmup):
        for side, fn in sides.items():
            outputs[side] = fn()
    times: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(repeats):
        for side, fn in sides.items():
            seconds, outputs[side] = timed(fn)
            times[side].append(seconds)
    return {side: (times[side], outputs[side]) for side in sides}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, fn())``, waiting for queued CUDA work so GPU time is counted."""
    _synchronize()
    started = time.perf_counter()
    output = fn()
    _synchronize()
    return time.perf_counter() - started, output


@dataclass
class Result:
    """One target's outcome: what was measured, the goal, and whether it was met.

    ``kind`` says how ``measured`` compares with ``goal``: ``min`` (measured >= goal, e.g. a
    speed-up) or ``max`` (measured <= goal, e.g. peak RSS or an overhead ratio). ``status`` is
    ``ok``, ``skipped`` (``note`` says why) or ``error``. ``met`` is None when nothing was measured
    or the target has no goal (``goal`` None: reported only).
    """

    target: str
    measured: float | None
    goal: float | None = None
    kind: str = "min"
    unit: str = "x"
    status: str = "ok"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        if self.status != "ok" or self.measured is None or self.goal is None:
            return None
        return self.measured >= self.goal if self.kind == "min" else self.measured <= self.goal

    @classmethod
    def speedup(cls, target: str, timing: Timing, goal: float | None, note: str = "", **extra: Any) -> Result:
        """A ``stock / ours`` ratio with both sides' median and per-round times in ``extra``."""
        times = {
            "ours_median_s": round(timing.ours_median_s, 4),
            "stock_median_s": round(timing.stock_median_s, 4),
            "ours_s": [round(s, 4) for s in timing.ours_s],
            "stock_s": [round(s, 4) for s in timing.stock_s],
        }
        return cls(target, round(timing.ratio, 3), goal, "min", "x", note=note, extra={**extra, **times})

    @classmethod
    def skipped(cls, target: str, why: str) -> Result:
        return cls(target, None, status="skipped", note=why)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, cores, RAM, load, torch, device."""
    import torch

    description: dict[str, Any] = {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cpu",
    }
    if torch.cuda.is_available():
        description["device"] = f"cuda: {torch.cuda.get_device_name(0)}"
        description["cuda"] = torch.version.cuda
        description["tf32"] = torch.backends.cudnn.allow_tf32
    return description


def device_for(size: str):
    """The torch device a size runs on: CUDA for ``gpu`` when present, else the CPU."""
    import torch

    return torch.device("cuda" if size == "gpu" and torch.cuda.is_available() else "cpu")


def reset_peak_rss() -> bool:
    """Restart this process's resident-set high-water mark (Linux), so the next peak is fresh;
    False where the kernel does not allow it (the peak then includes everything before)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark (VmHWM) in MiB since the last reset."""
    return _status_mib("VmHWM")


def rss_mib() -> float:
    """This process's resident set (VmRSS) now, in MiB."""
    return _status_mib("VmRSS")


def module_json(module: str, *args: str, timeout: float = 1800) -> dict[str, Any]:
    """Run ``python -m MODULE ARGS`` in a fresh process (its own peak RSS) and parse its last stdout line as JSON."""
    out = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    if out.returncode:
        raise RuntimeError(f"{module} {' '.join(args)[:80]} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
