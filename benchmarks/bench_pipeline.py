"""Targets 5-7: Network Dissection's memory and speed, Prefect's overhead, the demo end to end.

5. Network Dissection of layer1-layer4 through the pipeline's own path
   (:func:`xai_audit.tasks.dissect.stage.netdissect_rows`) on N and 4N world probe images, each in a fresh
   subprocess: the growth of the resident-set high-water mark (VmHWM) over the process's RSS just
   before the dissection (model loaded, imports done), so import-time peaks cannot hide growth; and
   seconds per 1,000 probe images.
6. The explain stage on 64 world images (gradcam) as the Prefect flow the audit runs
   (:func:`xai_audit.flows.explain.explain_model`, one task per chunk) against the same task functions
   called in a plain loop, alternating, after a warm-up round (which pays the one-time start of
   Prefect's API); overhead = median over rounds of flow / loop (goal <= 1.15, i.e. 15 %).
7. ``xai-audit run configs/demo.yaml`` in a subprocess: warm (the cache of ``$XAI_AUDIT_CACHE``, after
   an untimed run that fills it) and, only in ``benchmarks.bench_demo_cold``, cold (an empty cache).

``tiny`` shrinks everything to a random-weight ResNet18 on a 32-image world (seconds, for the
smoke test); ``cpu`` is the issue's setting. Every timing records the load average around it,
because this machine is shared.
"""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from benchmarks.harness import Result, interleave, module_json, peak_rss_mib, reset_peak_rss, rss_mib

TARGETS = (
    "5 Network Dissection peak RSS, 4x probe images",
    "5 Network Dissection seconds per 1,000 probe images",
    "6 Orchestration overhead (Prefect flow / plain loop)",
    "7 demo warm",
)

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"

SETTINGS = {
    "tiny": dict(probe_images=8, explain_images=8, repeats=1, demo_runs=1),
    "cpu": dict(probe_images=250, explain_images=64, repeats=7, demo_runs=2),
    "gpu": dict(probe_images=250, explain_images=64, repeats=3, demo_runs=2),
}
# issue 8's memory goal; issue 19's orchestration and demo goals (they replaced issue 8's 1.15x, 90 s, 480 s)
GOALS = {"netdissect_rss": 1.25, "overhead_ratio": 1.10, "demo_warm_s": 60.0, "demo_cold_s": 300.0}


PIPELINE_PACKAGES = ("prefect", "pydantic", "duckdb", "matplotlib", "lime", "pytorch_grad_cam", "open_clip")


def tiny_resnet():
    """A ResNet18 with fixed random weights (3 classes): the real architecture, nothing to train."""
    import torch
    from torchvision.models import resnet18

    torch.manual_seed(0)
    return resnet18(num_classes=3)


def tiny_config() -> dict:
    """The demo config shrunk to seconds: a random-weight ResNet18, a 32-image world, no toy CLIP."""
    return {
        "name": "bench-tiny",
        "seed": 0,
        "device": "cpu",
        "world": {"n_train": 1, "n_val": 32},
        "models": [
            {
                "name": "tiny",
                "source": "python",
                "callable": "benchmarks.bench_pipeline:tiny_resnet",
                "num_classes": 3,
                "preprocess": {"resize": 64, "crop": 64},
                "layers": ["layer1", "layer2", "layer3", "layer4"],
                "cam_layer": "layer3",
            }
        ],
        # a random model labelled on the world on purpose: the demo's stages at seconds' size
        "dissect": {
            "methods": ["netdissect"],
            "probe": {"kind": "world", "split": "val", "batch_size": 8},
            "allow_synthetic": True,
        },
        "images": {"kind": "world", "split": "val", "limit": 8},
        "explain": {
            "methods": ["gradcam", "lime"],
            "chunk_size": 4,
            "batch_size": 4,
            "lime": {"num_samples": 20, "batch_size": 20},
            "metrics": {"steps": 4, "baseline": "mean"},
        },
    }


def base_config(size: str) -> dict:
    """The config a size starts from: the demo's own for ``cpu``/``gpu``, :func:`tiny_config` for ``tiny``."""
    if size == "tiny":
        return tiny_config()
    return yaml.safe_load(DEMO_CONFIG.read_text())


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------------------------
# 5. Network Dissection


def netdissect_measurement(config_data: dict, n_images: int) -> dict[str, Any]:
    """Network Dissection of the first model's layers on ``n_images`` probe images, in this process:
    seconds, RSS before, peak and growth (MiB). Meant to run in a fresh process per size."""
    from xai_audit.tasks.compute.device import resolve_device
    from xai_audit.tasks.core.config import parse_config
    from xai_audit.tasks.data.loaded_models import using_model
    from xai_audit.tasks.dissect.probe import open_probe
    from xai_audit.tasks.dissect.stage import model_layers, netdissect_rows, threshold_files

    data = json.loads(json.dumps(config_data))
    data["dissect"]["probe"]["limit"] = n_images
    config = parse_config(data)
    probe = open_probe(config)
    with using_model(config, config.models[0]) as model:
        layers = model_layers(model, config.models[0].layers)
        for path in threshold_files(
            model, probe, layers, config.dissect.netdissect, resolve_device(config.device)
        ).values():
            path.unlink(missing_ok=True)  # measure every pass: thresholds, then IoUs
        reset_peak_rss()
        base = rss_mib()
        started = time.perf_counter()
        frames = netdissect_rows(config, model, layers, probe)
        seconds = time.perf_counter() - started
        peak = peak_rss_mib()
        started = time.perf_counter()
        netdissect_rows(config, model, layers, probe)  # what a warm run pays: thresholds from the cache
        warm_seconds = time.perf_counter() - started
    return {
        "images": len(probe.image_ids),
        "layers": layers,
        "seconds": round(seconds, 2),
        "warm_seconds": round(warm_seconds, 2),
        "rss_before_mib": round(base, 1),
        "peak_mib": round(peak, 1),
        "growth_mib": round(peak - base, 1),
        "units": sum(len(f) for f in frames.values()),
        "load": _load(),
    }


def _netdissect_subprocess(config_data: dict, n_images: int) -> dict[str, Any]:
    return module_json("benchmarks.bench_pipeline", "netdissect", json.dumps(config_data), str(n_images))


def netdissect_results(size: str) -> list[Result]:
    """Target 5: growth of peak RSS on 4x the probe images, and seconds per 1,000 probe images, of
    the streaming dissection (the target's definition: no permutation test); then, reported, the
    same at 4x with the config's permutation test, which keeps every probe image's masks."""
    config = base_config(size)
    config["dissect"]["methods"] = ["netdissect"]
    tested = json.loads(json.dumps(config))
    config["dissect"]["significance"] = {"permutations": 0}
    small_n = SETTINGS[size]["probe_images"]
    small, large = _netdissect_subprocess(config, small_n), _netdissect_subprocess(config, 4 * small_n)
    with_test = _netdissect_subprocess(tested, 4 * small_n)
    permutations = tested["dissect"].get("significance", {}).get("permutations", 0)
    if large["images"] < 4 * small["images"]:
        raise RuntimeError(f"the probe set has only {large['images']} images, not {4 * small['images']}")
    ratio = large["growth_mib"] / max(small["growth_mib"], 1.0)
    per_thousand = large["seconds"] / large["images"] * 1000
    layers = "-".join((large["layers"][0], large["layers"][-1]))
    return [
        Result(
            "5 Network Dissection peak RSS, 4x probe images",
            round(ratio, 3),
            GOALS["netdissect_rss"],
            "max",
            "x",
            note=(
                f"peak-RSS growth over the pre-dissection RSS, {small['images']} vs {large['images']} images, {layers}"
            ),
            extra={
                "growth_mib": [small["growth_mib"], large["growth_mib"]],
                "peak_mib": [small["peak_mib"], large["peak_mib"]],
                "rss_before_mib": [small["rss_before_mib"], large["rss_before_mib"]],
                "images": [small["images"], large["images"]],
            },
        ),
        Result(
            "5 Network Dissection seconds per 1,000 probe images",
            round(per_thousand, 1),
            None,
            "max",
            "s",
            note=f"{layers} of the {'demo' if size != 'tiny' else 'tiny'} model, thresholds + IoU passes, "
            f"{large['images']} images in {large['seconds']:.1f} s; with cached thresholds (a warm run) "
            f"{large['warm_seconds'] / large['images'] * 1000:.1f} s per 1,000",
            extra={
                "images": large["images"],
                "seconds": large["seconds"],
                "warm_seconds": large["warm_seconds"],
                "load": large["load"],
            },
        ),
        Result(
            "5 Network Dissection with its permutation test, warm seconds per 1,000 probe images",
            round(with_test["warm_seconds"] / with_test["images"] * 1000, 1),
            None,
            "max",
            "s",
            note=f"{permutations} permutations (the config's dissect.significance), cached thresholds; peak-RSS "
            f"growth {with_test['growth_mib']:.0f} MiB at {with_test['images']} images vs {large['growth_mib']:.0f}"
            " MiB without the test (it keeps every probe image's masks and active maps)",
            extra={
                "permutations": permutations,
                "warm_seconds": with_test["warm_seconds"],
                "warm_seconds_without": large["warm_seconds"],
                "growth_mib": with_test["growth_mib"],
                "growth_mib_without": large["growth_mib"],
            },
        ),
    ]


# --------------------------------------------------------------------------------------------
# 6. orchestration overhead


def orchestration_result(size: str) -> Result:
    """Target 6: the explain stage as a Prefect flow vs the same task functions in a plain loop."""
    from xai_audit.flows.explain import explain_model
    from xai_audit.flows.runner import local_run_settings, subflow_task_runner, with_task_runner
    from xai_audit.storage.parquet import ResultsStore
    from xai_audit.storage.runs import new_run_id
    from xai_audit.tasks.core.config import parse_config
    from xai_audit.tasks.data.image_sets import list_image_set
    from xai_audit.tasks.explain.tasks import explain_chunk

    data = base_config(size)
    data["images"]["limit"] = SETTINGS[size]["explain_images"]
    data["explain"]["methods"] = ["gradcam"]
    data["explain"]["sanity"] = {"enabled": False}  # the loop side runs the chunks only
    config = parse_config(data)
    model_name = config.models[0].name
    with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as results:
        store = ResultsStore(results)
        n_images = config.images.limit

        def flow_side() -> (
            int
        ):  # with the task runner the audit gives this subflow; both sides list into their run first
            run_id = new_run_id("flow")
            n_chunks = list_image_set(config, store, run_id)
            with local_run_settings():  # as `xai-audit run` does
                return with_task_runner(explain_model, subflow_task_runner(config))(
                    config, model_name, n_chunks, results, run_id
                )

        def loop_side() -> int:
            run_id = new_run_id("loop")
            n_chunks = list_image_set(config, store, run_id)
            for index in range(n_chunks):
                explain_chunk.fn(config, model_name, index, results, run_id)
            return n_chunks

        load = _load()
        started = time.perf_counter()
        runs = interleave({"flow": flow_side, "loop": loop_side}, repeats=SETTINGS[size]["repeats"], warmup=1)
        total = time.perf_counter() - started
    flow_s, loop_s = runs["flow"][0], runs["loop"][0]
    if runs["flow"][1] != runs["loop"][1]:
        raise RuntimeError(f"the flow ran {runs['flow'][1]} chunks, the loop {runs['loop'][1]}")
    ratio = statistics.median(flow / loop for flow, loop in zip(flow_s, loop_s))
    return Result(
        "6 Orchestration overhead (Prefect flow / plain loop)",
        round(ratio, 3),
        GOALS["overhead_ratio"],
        "max",
        "x",
        note=f"{n_images} images, gradcam + metrics, {runs['flow'][1]} chunk tasks; median flow / loop over "
        f"{len(flow_s)} alternating rounds after a warm-up round (which also starts Prefect's API)",
        extra={
            "flow_s": [round(s, 2) for s in flow_s],
            "loop_s": [round(s, 2) for s in loop_s],
            "load_start": load,
            "load_end": _load(),
            "seconds_total": round(total, 1),
        },
    )


# --------------------------------------------------------------------------------------------
# 7. the demo end to end


def demo_run(config_path: Path, results: Path, env: dict[str, str]) -> dict[str, Any]:
    """One ``xai-audit run CONFIG --new`` in a subprocess: wall seconds, load, and the run's stage timings."""
    from xai_audit.storage.parquet import ResultsStore
    from xai_audit.storage.runs import RunRecord

    command = [
        str(Path(sys.executable).with_name("xai-audit")),
        "run",
        str(config_path),
        "--results",
        str(results),
        "--new",
    ]
    if not Path(command[0]).exists():
        command = [sys.executable, "-m", "xai_audit.flows.cli", *command[1:]]
    load = _load()
    cpu_before = _children_cpu_s()
    started = time.perf_counter()
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - started
    cpu = _children_cpu_s() - cpu_before
    if out.returncode not in (0, 3):
        raise RuntimeError(f"xai-audit run exited {out.returncode}: {out.stderr[-2000:]}")
    match = re.search(r"^run (\S+): (\w+)", out.stdout, re.MULTILINE)
    timings = RunRecord.load(ResultsStore(str(results)), match.group(1)).timings if match else {}
    stages = {name: round(value, 1) for name, value in timings.items()}
    stages["rest"] = round(
        seconds - sum(timings.values()), 1
    )  # interpreter + Prefect start, preparation, summary, report
    return {
        "seconds": round(seconds, 1),
        "cpu_s": round(cpu, 1),
        "status": match.group(2) if match else "?",
        "stages_s": stages,
        "load_start": load,
        "load_end": _load(),
    }


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children: a load-independent cost."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def demo_config_path(size: str, folder: Path) -> Path:
    """The demo config itself, or the tiny config written to ``folder``."""
    if size != "tiny":
        return DEMO_CONFIG
    path = folder / "bench-tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config()))
    return path


def demo_warm_result(size: str) -> Result:
    """Target 7, warm: an untimed run fills the cache, then ``demo_runs`` timed runs (median)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as folder:
        folder = Path(folder)
        config = demo_config_path(size, folder)
        fill = demo_run(config, folder / "results", env)
        runs = [demo_run(config, folder / "results", env) for _ in range(SETTINGS[size]["demo_runs"])]
    median = statistics.median(run["seconds"] for run in runs)
    cache = f"XAI_AUDIT_CACHE={env.get('XAI_AUDIT_CACHE', '~/.cache/xai-audit')}"
    return Result(
        "7 demo warm",
        median,
        GOALS["demo_warm_s"],
        "max",
        "s",
        note=f"`xai-audit run {config.name}` in a subprocess with {cache}, median of {len(runs)} runs after one that "
        f"filled the cache ({fill['seconds']:.0f} s); load {runs[0]['load_start']} at start",
        extra={
            "seconds": [run["seconds"] for run in runs],
            "cpu_s": [run["cpu_s"] for run in runs],
            "stages_s": runs[-1]["stages_s"],
            "load_start": [run["load_start"] for run in runs],
            "filling_run_s": fill["seconds"],
        },
    )


def demo_cold_result(size: str) -> Result:
    """Target 7, cold: one run with an empty cache (world, demo model and toy CLIP generated and trained)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="bench-demo-cold-") as folder:
        folder = Path(folder)
        env["XAI_AUDIT_CACHE"] = str(folder / "cache")
        config = demo_config_path(size, folder)
        run = demo_run(config, folder / "results", env)
    return Result(
        "7 demo cold",
        run["seconds"],
        GOALS["demo_cold_s"],
        "max",
        "s",
        note=f"`xai-audit run {config.name}` in a subprocess with an empty cache; load {run['load_start']} at start",
        extra={key: run[key] for key in ("cpu_s", "stages_s", "load_start", "load_end")},
    )


@contextmanager
def private_cache(size: str) -> Iterator[None]:
    """At ``tiny`` size a temporary ``XAI_AUDIT_CACHE`` (the smoke test leaves the user's cache alone)."""
    if size != "tiny":
        yield
        return
    before = os.environ.get("XAI_AUDIT_CACHE")
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as folder:
        os.environ["XAI_AUDIT_CACHE"] = folder
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("XAI_AUDIT_CACHE", None)
            else:
                os.environ["XAI_AUDIT_CACHE"] = before


def run(size: str) -> list[Result]:
    """Targets 5, 6 and 7 (warm) at ``size``; each failure is recorded without losing the others.

    They run the installed pipeline, so a machine without its packages (the GPU script's bare
    torch image) records them as skipped, naming what is missing, instead of as errors.
    """
    import importlib.util

    missing = [name for name in PIPELINE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"the pipeline needs {', '.join(missing)} (pip install -e .)")
    results: list[Result] = []
    with private_cache(size):
        for name, measure in (
            ("5 Network Dissection", netdissect_results),
            ("6 Orchestration overhead", orchestration_result),
            ("7 demo warm", demo_warm_result),
        ):
            try:
                measured = measure(size)
            except Exception as error:  # noqa: BLE001 - one broken target must not lose the others' numbers
                measured = [
                    Result(target, None, status="error", note=f"{type(error).__name__}: {str(error)[-300:]}")
                    for target in TARGETS
                    if target.startswith(name)
                ]
            results += measured if isinstance(measured, list) else [measured]
    return results


if __name__ == "__main__":  # the per-size subprocess of target 5
    if sys.argv[1:2] != ["netdissect"] or len(sys.argv) != 4:
        raise SystemExit("usage: python -m benchmarks.bench_pipeline netdissect CONFIG_JSON N_IMAGES")
    print(json.dumps(netdissect_measurement(json.loads(sys.argv[2]), int(sys.argv[3]))))
