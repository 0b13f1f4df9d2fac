"""How far the demo's model-dependent assertions are from failing, over the training variants a
user's machine can produce (issue 37).

    python -m benchmarks.demo_spread [--variants bf16=on,seed=0 ...] [--out benchmarks/results/demo-spread]

bf16 autocast runs other kernels on AMX than on AVX512-BF16 (and fp32 others again), so the trained
demo model and toy CLIP differ between CPUs; seeds stand in for the digits a CPU moves. For each
variant (bf16 on/off x seed 0-2 by default) this trains (or finds cached) both models, runs the
tests marked ``demo_model`` against them in a fresh pytest (``XAI_AUDIT_DEMO_RECIPE`` names the
variant, ``XAI_AUDIT_MARGINS`` collects each bound's observed value: ``tests/fixtures/margins.py``)
and writes ``OUT.json`` and ``OUT.md``: pass/fail per test per variant, and per assertion its
values and its margin, the smallest over the variants. Variants already in ``OUT.json`` from an
earlier run on this machine are kept unless run again, so the spread can be filled in variant by
variant while the models train.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.harness import machine
from xai_audit.tasks.compute.precision import CPU_BF16_FLAGS, cpu_flags, describe_cpu_kernels
from xai_audit.tasks.core.config import WorldConfig
from xai_audit.tasks.world.demo_model import DemoTrainSpec, ensure_demo_model
from xai_audit.tasks.world.recipe import RECIPE_ENV, DemoRecipe, parse_recipe
from xai_audit.tasks.world.toy_clip import ClipTrainSpec, ensure_toy_clip

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = [DemoRecipe(bf16=bf16, seed=seed) for bf16 in (True, False) for seed in (0, 1, 2)]
MARGINS_ENV = "XAI_AUDIT_MARGINS"  # tests/fixtures/margins.py's variable (tests are not imported here)


def spread_machine() -> dict[str, Any]:
    """The harness's machine description plus the CPU's precision path (what moves the digits)."""
    import torch

    flags = cpu_flags()
    return {
        **machine(),
        "cpu_kernels": describe_cpu_kernels(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_flags": {flag: flag in flags for flag in (*CPU_BF16_FLAGS, "amx_tile")},
    }


def trained_models(recipe: DemoRecipe) -> dict[str, Any]:
    """Train (or find cached) the variant's demo model and toy CLIP; what their meta.json say."""
    world = WorldConfig()
    demo = ensure_demo_model(world, DemoTrainSpec(**asdict(recipe)))
    clip = ensure_toy_clip(world, ClipTrainSpec(**asdict(recipe)))
    demo_meta = json.loads((demo / "meta.json").read_text())
    clip_meta = json.loads((clip.parent / "meta.json").read_text())
    return {
        "demo_model": str(demo),
        "demo_val_accuracy": demo_meta["val_accuracy"],
        "toy_clip": str(clip),
        "toy_clip_zero_shot_val": clip_meta["zero_shot_val"],
    }


def junit_outcomes(path: Path) -> dict[str, dict[str, str]]:
    """Test id -> {"outcome": passed|failed|error|skipped, "message": first line of the failure}."""
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                message = (found.get("message") or "").splitlines()[0][:300] if found.get("message") else ""
                break
        outcomes[test] = {"outcome": outcome, "message": message}
    return outcomes


def run_variant(recipe: DemoRecipe, timeout: float) -> dict[str, Any]:
    """Train the variant's models, then run the tests marked demo_model or toy_clip against them in a fresh pytest."""
    start = time.perf_counter()
    models = trained_models(recipe)
    trained_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="demo-spread-") as folder:
        junit, margins = Path(folder) / "junit.xml", Path(folder) / "margins.jsonl"
        env = {**os.environ, RECIPE_ENV: recipe.label(), MARGINS_ENV: str(margins)}
        command = [sys.executable, "-m", "pytest", "-m", "demo_model or toy_clip", "-p", "no:cacheprovider", "-q"]
        command += ["--junitxml", str(junit), "tests"]
        started = time.perf_counter()
        process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        tests_s = time.perf_counter() - started
        if not junit.is_file():
            raise RuntimeError(f"pytest wrote no report (exit {process.returncode}): {process.stderr[-2000:]}")
        rows = [json.loads(line) for line in margins.read_text().splitlines()] if margins.is_file() else []
        outcomes = junit_outcomes(junit)
    return {
        "recipe": recipe.label(),
        "cpu_kernels": describe_cpu_kernels(),  # merged reports keep variants from this machine only
        "models": models,
        "pytest_exit": process.returncode,
        "tests": outcomes,
        "margins": rows,
        "seconds": {"models": round(trained_s, 1), "tests": round(tests_s, 1)},
    }


def assertion_spread(variants: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per assertion (test, name): its bound, each variant's value and the smallest margin."""
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for label, result in variants.items():
        for row in result["margins"]:
            entry = table.setdefault(
                (row["test"], row["name"]),
                {"test": row["test"], "name": row["name"], "kind": row["kind"], "bound": row["bound"], "values": {}},
            )
            entry["values"][label] = row["value"]
            margin = row["margin"]
            if "min_margin" not in entry or margin < entry["min_margin"]:
                entry["min_margin"], entry["min_variant"] = margin, label
    return sorted(table.values(), key=lambda entry: (entry["test"], entry["name"]))


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: machine, models, pass/fail per test per variant, margins."""
    variants = report["variants"]
    labels = [label for label in (v.label() for v in VARIANTS) if label in variants]
    labels += [label for label in variants if label not in labels]
    host = report["machine"]
    lines = [
        "# Demo recipe spread (issue 37)",
        "",
        f"Generated by `python -m benchmarks.demo_spread` ({report['generated_at']}). Machine: {host['cpu']}, "
        f"{host['cores']} cores, torch {host['torch']}, CPU kernels `{host['cpu_kernels']}` "
        f"(torch capability {host['cpu_capability']}; flags {host['bf16_flags']}).",
        "",
        "## Models per variant",
        "",
        "| variant | demo val accuracy | toy CLIP zero-shot colour / shape / texture |",
        "|---|---|---|",
    ]
    for label in labels:
        models = variants[label]["models"]
        shot = models["toy_clip_zero_shot_val"]
        lines.append(
            f"| {label} | {models['demo_val_accuracy']:.4f} | "
            f"{shot['color']:.3f} / {shot['object']:.3f} / {shot['texture']:.3f} |"
        )
    tests = sorted({test for label in labels for test in variants[label]["tests"]})
    lines += ["", "## Tests marked demo_model or toy_clip, per variant", "", "| test | " + " | ".join(labels) + " |"]
    lines.append("|---|" + "---|" * len(labels))
    for test in tests:
        cells = []
        for label in labels:
            outcome = variants[label]["tests"].get(test, {"outcome": "not run"})["outcome"]
            cells.append("pass" if outcome == "passed" else f"**{outcome}**")
        lines.append(f"| `{test}` | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Assertions: bound, value per variant, smallest margin",
        "",
        "Margin: distance from the bound on the passing side (negative: the assertion failed).",
        "",
        "| test | assertion | bound | " + " | ".join(labels) + " | min margin (variant) |",
        "|---|---|---|" + "---|" * len(labels) + "---|",
    ]
    for entry in report["assertions"]:
        values = [f"{entry['values'][label]:.4g}" if label in entry["values"] else "" for label in labels]
        test = entry["test"].split("::", 1)[-1]
        lines.append(
            f"| `{test}` | {entry['name']} | {entry['kind']} {entry['bound']:g} | "
            + " | ".join(values)
            + f" | {entry['min_margin']:.4g} ({entry['min_variant']}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", help="recipes as XAI_AUDIT_DEMO_RECIPE spells them (default: all six)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo-spread"), help="path stem")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per variant's pytest")
    args = parser.parse_args(argv)
    recipes = [parse_recipe(text) for text in args.variants] if args.variants else VARIANTS
    out = Path(args.out)
    json_path, md_path = out.with_suffix(".json"), out.with_suffix(".md")
    report = json.loads(json_path.read_text()) if json_path.is_file() else {"variants": {}}
    if report.get("machine", {}).get("cpu") != spread_machine()["cpu"]:
        report["variants"] = {}  # another machine's variants are not this machine's spread
    report["machine"] = spread_machine()
    for recipe in recipes:
        print(f"{recipe.label()}: training or loading the models, then the demo_model and toy_clip tests", flush=True)
        result = run_variant(recipe, args.timeout)
        report["variants"][recipe.label()] = result
        report["assertions"] = assertion_spread(report["variants"])
        report["generated_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        md_path.write_text(markdown(report))
        failed = [test for test, row in result["tests"].items() if row["outcome"] != "passed"]
        print(f"{recipe.label()}: {len(result['tests']) - len(failed)}/{len(result['tests'])} passed {failed}")
    return (
        0 if all(row["outcome"] == "passed" for r in report["variants"].values() for row in r["tests"].values()) else 1
    )


if __name__ == "__main__":
    sys.exit(main())
