"""``python -m benchmarks``: run the suite, write its JSON, print a table, optionally update RESULTS.md.

    python -m benchmarks [--size tiny|cpu|gpu] [--only NAME ...] [--out PATH]
                         [--markdown benchmarks/RESULTS.md] [--budget SECONDS]
    python -m benchmarks --render RUN.json --markdown benchmarks/RESULTS.md

NAME is a benchmark module without its ``bench_`` prefix (``lime``, ``cams``, ``clip_dissect``,
``pipeline``). The JSON is rewritten after every benchmark, so a run cut short keeps what it
measured; ``--budget`` skips (and records) the benchmarks not started within that many seconds.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# lime_image and grad-cam's ScoreCAM draw progress bars (no switch); tqdm reads this at import.
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

import benchmarks
from benchmarks.harness import SIZES, Result, machine
from benchmarks.report import console_table, update_markdown

RESULTS_DIR = Path(__file__).parent / "results"
ON_REQUEST = ("demo_cold",)  # benchmarks that run only when --only names them


def benchmark_names() -> list[str]:
    """Every ``bench_<name>`` module of the package, by name, sorted."""
    return sorted(
        m.name[len("bench_") :] for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_")
    )


def run_suite(size: str, only: list[str] | None, out: Path, budget: float | None = None) -> dict[str, Any]:
    """Run the selected benchmarks at ``size``, writing the run's JSON to ``out`` after each."""
    names = benchmark_names()
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {', '.join(unknown)}; valid: {', '.join(names)}")
    started = time.perf_counter()
    # fp32 means fp32 on both sides: with TF32 convolutions (PyTorch's CUDA default) layouts that
    # pick different kernels round differently, and maps could not be compared to 1e-5.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    run: dict[str, Any] = {
        "size": size,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "benchmarks": {},
        "results": [],
    }
    for name in names:
        if only and name not in only:
            continue
        elapsed = time.perf_counter() - started
        if budget is not None and elapsed > budget:
            results = _placeholders(name, "skipped", f"time budget of {budget:.0f} s spent before it started")
            seconds = 0.0
        elif name in ON_REQUEST and not only:
            results = _placeholders(name, "skipped", f"runs only when named (minutes long): --only {name}")
            seconds = 0.0
        else:
            print(f"[{elapsed:6.0f} s] {name} ...", file=sys.stderr, flush=True)
            seconds, results = _run_one(name, size)
        run["benchmarks"][name] = {"seconds": round(seconds, 1), "targets": [r.target for r in results]}
        run["results"] += [r.to_json() for r in results]
        run["seconds"] = round(time.perf_counter() - started, 1)
        _write(out, run)
    run["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    _write(out, run)
    return run


def _run_one(name: str, size: str) -> tuple[float, list[Result]]:
    started = time.perf_counter()
    try:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        results = module.run(size)
    except ImportError as error:  # a library missing on this machine (e.g. the GPU box)
        results = _placeholders(name, "skipped", f"missing library: {error}")
    except Exception as error:  # noqa: BLE001 - one broken benchmark must not lose the others' numbers
        traceback.print_exc()
        results = _placeholders(name, "error", f"{type(error).__name__}: {error}")
    return time.perf_counter() - started, results


def _placeholders(name: str, status: str, why: str) -> list[Result]:
    """One unmeasured result per target the module declares (its ``TARGETS``), else one for the module."""
    try:
        targets = importlib.import_module(f"benchmarks.bench_{name}").TARGETS
    except Exception:  # noqa: BLE001 - a module that fails to import still gets its placeholder row
        targets = (name,)
    return [Result(target, None, status=status, note=why) for target in targets]


def _write(path: Path, run: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(run, indent=2) + "\n")
    temporary.replace(path)


def default_out(size: str) -> Path:
    """``benchmarks/results/<date>-<host>.json`` (``-<size>`` appended for sizes other than cpu)."""
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    suffix = "" if size == "cpu" else f"-{size}"
    return RESULTS_DIR / f"{day}-{machine()['host']}{suffix}.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=SIZES, default="cpu")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help=f"benchmarks to run; all: {', '.join(benchmark_names())}"
    )
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/<date>-<host>.json)")
    parser.add_argument("--markdown", type=Path, help="update this RESULTS.md's block for the run's size")
    parser.add_argument("--budget", type=float, help="seconds after which benchmarks not yet started are skipped")
    parser.add_argument("--render", type=Path, metavar="RUN.json", help="render a saved run instead of running")
    args = parser.parse_args(argv)
    if args.render:
        run = json.loads(args.render.read_text())
    else:
        run = run_suite(args.size, args.only, args.out or default_out(args.size), args.budget)
        print(f"wrote {args.out or default_out(args.size)}", file=sys.stderr)
    print(console_table(run))
    if args.markdown:
        update_markdown(args.markdown, run)
        print(f"updated {args.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
