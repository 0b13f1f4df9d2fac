"""``xai-audit run`` as a process: the Prefect home and API it uses, and how it ends when killed.

Every test runs the CLI in a subprocess with an environment free of the developer's Prefect
settings (``HOME`` and the cache point into the test's folder), on a tiny model and a folder of
random images, so what it shows holds on a fresh machine.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from PIL import Image

from xai_audit.storage.parquet import ResultsStore

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def tiny_run(tmp_path: Path, n_images: int = 3, lime: bool = False) -> tuple[list[str], dict[str, str], Path]:
    """The command, environment and results root of a small audit of random images."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(n_images):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(images / f"{index:03d}.png")
    methods = ["gradcam", "lime"] if lime else ["gradcam"]
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "process-tiny",
                "device": "cpu",
                "models": [
                    {
                        "name": "tiny",
                        "source": "python",
                        "callable": "tests.fixtures.tiny_models:tiny_resnet",
                        "num_classes": 3,
                        "preprocess": {"resize": 48, "crop": 48},
                    }
                ],
                "images": {"kind": "folder", "root": str(images)},
                "dissect": {"enabled": False},
                "explain": {"methods": methods, "chunk_size": 1, "lime": {"num_samples": 400}},
            }
        )
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env |= {"HOME": str(tmp_path / "home"), "XAI_AUDIT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    (tmp_path / "home").mkdir()
    results = tmp_path / "results"
    return [sys.executable, "-m", "xai_audit.flows.cli", "run", str(config), "--results", str(results)], env, results


def alembic_revision(database: Path) -> str:
    with sqlite3.connect(database) as connection:
        return connection.execute("select version_num from alembic_version").fetchone()[0]


def test_a_default_prefect_home_migrated_by_another_version_does_not_stop_a_run(tmp_path):
    """``~/.prefect/prefect.db`` stamped with a revision this Prefect does not know (what a newer
    Prefect's migration leaves) breaks Prefect's own ephemeral API; a run does not use it."""
    command, env, results = tiny_run(tmp_path)
    broken_home = Path(env["HOME"]) / ".prefect"
    broken_home.mkdir()
    with sqlite3.connect(broken_home / "prefect.db") as connection:
        connection.execute("create table alembic_version (version_num varchar(32) not null primary key)")
        connection.execute("insert into alembic_version values ('27d8f4e1a6c9')")

    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert "Traceback" not in finished.stderr
    own = Path(env["XAI_AUDIT_CACHE"]) / "prefect" / metadata.version("prefect") / "prefect.db"
    assert own.is_file() and alembic_revision(own) != "27d8f4e1a6c9"
    assert alembic_revision(broken_home / "prefect.db") == "27d8f4e1a6c9"  # untouched
    assert ResultsStore(str(results)).read("runs")["status"].tolist() == ["completed"]

    # The construction is real: pointed at that home on purpose, the run stops with one error line.
    chosen = subprocess.run(
        command, cwd=REPO, env=env | {"PREFECT_HOME": str(broken_home)}, capture_output=True, text=True, timeout=300
    )
    assert chosen.returncode == 2, chosen.stderr
    errors = [line for line in chosen.stderr.splitlines() if line.startswith("xai-audit:")]
    assert len(errors) == 1 and "private Prefect API server exited" in errors[0], chosen.stderr
    assert "PREFECT_HOME" in errors[0] and "Traceback" not in chosen.stderr


def test_an_unreachable_prefect_api_url_exits_2_with_one_line(tmp_path):
    command, env, results = tiny_run(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends
    url = f"http://127.0.0.1:{port}/api"
    finished = subprocess.run(
        command, cwd=REPO, env=env | {"PREFECT_API_URL": url}, capture_output=True, text=True, timeout=120
    )
    assert finished.returncode == 2
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, finished.stderr
    assert url in lines[0] and "not reachable" in lines[0] and "unset PREFECT_API_URL" in lines[0]
    assert not results.exists() or not any(results.rglob("*.parquet"))  # no work was started


def start_until_explaining(tmp_path: Path) -> tuple[subprocess.Popen, list[psutil.Process], Path, Path]:
    """A run started in the background, once its explain stage has written a first file; with
    every process it has started by then, its results root and its stderr file."""
    command, env, results = tiny_run(tmp_path, n_images=40, lime=True)
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=sink)
    saliency = results / "saliency"
    deadline = time.monotonic() + 240
    while not (saliency.exists() and any(saliency.rglob("*.parquet"))):
        assert process.poll() is None, stderr.read_text()
        assert time.monotonic() < deadline, "the run never reached its explain stage"
        time.sleep(0.5)
    children = psutil.Process(process.pid).children(recursive=True)
    assert children, "the run started no process of its own (expected its Prefect API server)"
    return process, children, results, stderr


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_a_killed_run_leaves_no_process_behind(tmp_path):
    process, children, _, _ = start_until_explaining(tmp_path)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    deadline = time.monotonic() + 10
    while alive(children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(children), [p.cmdline() for p in alive(children)]


def test_sigterm_stops_a_run_within_seconds_and_records_why(tmp_path):
    process, children, results, stderr = start_until_explaining(tmp_path)
    process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    returncode = process.wait(timeout=10)
    assert time.monotonic() - started < 10
    assert returncode == 128 + signal.SIGTERM, stderr.read_text()
    assert "stopped by SIGTERM" in stderr.read_text()
    runs = ResultsStore(str(results)).read("runs")
    assert runs["status"].tolist() == ["failed"]
    assert "SIGTERM" in runs["message"].iloc[0]
    time.sleep(1)
    assert not alive(children), [p.cmdline() for p in alive(children)]


def test_a_run_reports_every_stage_and_never_goes_30_s_without_a_line(tmp_path):
    """stdout/stderr not a terminal (a CI log, a Prefect worker): plain timestamped lines, at
    least one per stage and at most 30 s apart from the start to the end, no traceback."""
    command, env, _ = tiny_run(tmp_path)
    config = yaml.safe_load(Path(command[4]).read_text())
    config |= {
        "world": {"n_train": 1, "n_val": 24, "seed": 7},
        # the tiny model labelled on the world on purpose: the stages' lines are what is tested
        "dissect": {
            "methods": ["netdissect"],
            "probe": {"kind": "world", "split": "val", "batch_size": 8},
            "allow_synthetic": True,
        },
        "images": {"kind": "world", "split": "val", "limit": 8},
        "explain": {"methods": ["gradcam"], "chunk_size": 2},
    }
    config["models"][0]["layers"] = ["layer3", "layer4"]
    Path(command[4]).write_text(yaml.safe_dump(config))
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    arrivals = [(started, "(start)")]
    for line in process.stdout:
        arrivals.append((time.monotonic(), line.rstrip()))
    assert process.wait(timeout=60) == 0, "\n".join(text for _, text in arrivals)
    arrivals.append((time.monotonic(), "(exit)"))
    gaps = [later - earlier for (earlier, _), (later, _) in zip(arrivals, arrivals[1:])]
    text = "\n".join(line for _, line in arrivals)
    assert max(gaps) <= 30, text
    for stage in (
        "Prefect",
        "synthetic world",
        "dissect tiny",
        "Network Dissection",
        "explain tiny",
        "summary",
        "report:",
    ):
        assert stage in text, (stage, text)
    for noise in ("Traceback", "initialized randomly"):
        assert noise not in text, text
