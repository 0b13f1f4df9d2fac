"""The production setup: a Prefect server on PostgreSQL, a work pool, a worker, the deployment, and
the ``gpu`` tag concurrency limit — side by side with the same setup on SQLite.

On a SQLite-backed API, the tag-slot check at every start of a ``gpu`` task often meets
"database is locked" and the client waits ~2 s before retrying (README, "Running in
production"); teams run Prefect on PostgreSQL. This test runs the deployed audit through a
worker on both databases and prints how long passed between one ``gpu`` task's end and the
next one's start (a measurement reported, not asserted: timings belong to benchmarks).
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.fixtures.debian import debian_tool
from tests.test_deployments import (
    BIN,
    REPO,
    free_port,
    run_deployed_audit,
    server_environment,
    stop,
    wait_healthy,
)
from xai_audit.storage.parquet import ResultsStore
from xai_audit.storage.runs import RunRecord

pytestmark = pytest.mark.slow
N_IMAGES = 8


def pg_bin() -> Path:
    """The folder of Debian's PostgreSQL server binaries (initdb, pg_ctl)."""

    def find() -> str | None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        return str(Path(found[-1]).parent) if found else None

    return Path(debian_tool("postgresql", find))


@contextmanager
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on loopback; yields an asyncpg URL of its ``prefect`` database.
    PostgreSQL refuses to run as root, so as root it runs as Debian's ``postgres`` user."""
    binaries = pg_bin()
    folder = Path(tempfile.mkdtemp(prefix="xai-audit-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        os.chown(folder, pwd.getpwnam("postgres").pw_uid, -1)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = folder / "data"

    def run(*command: str) -> None:
        done = subprocess.run([*as_user, *command], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}{done.stderr[-2000:]}"

    run(str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    run(str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start")
    try:
        run(str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "prefect")
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect"
    finally:
        run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def gpu_task_gaps(api_url: str) -> list[float]:
    """Seconds between one ``gpu``-tagged task run's end and the next one's start. The run's
    tasks go one at a time (``runner.workers: 1``), so a gap is what starting a task costs —
    the tag-slot check included."""
    request = urllib.request.Request(
        f"{api_url}/task_runs/filter",
        data=json.dumps({"task_runs": {"tags": {"all_": ["gpu"]}}, "limit": 200}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        runs = [run for run in json.load(response) if run["start_time"] and run["end_time"]]
    spans = sorted((datetime.fromisoformat(r["start_time"]), datetime.fromisoformat(r["end_time"])) for r in runs)
    return [(later[0] - earlier[1]).total_seconds() for earlier, later in zip(spans, spans[1:])]


def deployed_audit(tmp_path: Path, database_url: str) -> dict:
    """Server on ``database_url``, work pool, worker, ``gpu`` limit 1, deploy, run; returns the
    run's status and the gaps between its gpu tasks."""
    images = tmp_path / "images" / "a"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{index}.png")
    config = tmp_path / "deployed.yaml"
    model = {
        "name": "tiny",
        "source": "python",
        "callable": "tests.fixtures.tiny_models:tiny_resnet",
        "class_names": ["a", "b", "c"],
        "preprocess": {"resize": 64, "crop": 64},
    }
    config.write_text(
        yaml.safe_dump(
            {
                "name": "deployed",
                "models": [model],
                "images": {"kind": "folder", "root": str(images.parent)},
                "dissect": {"enabled": False},
                "explain": {"methods": ["gradcam"], "chunk_size": 1},
            }
        )
    )
    results = tmp_path / "results"
    api_url = f"http://127.0.0.1:{free_port()}/api"
    env = server_environment(tmp_path, api_url, database_url)

    def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        done = subprocess.run(list(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{args}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    background = []
    prefect = str(BIN / "prefect")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
    try:
        port = api_url.split(":")[2].split("/")[0]
        server = subprocess.Popen(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", port], cwd=tmp_path, env=env, **quiet
        )
        background.append(server)
        wait_healthy(api_url, server)
        cli(prefect, "work-pool", "create", "xai-gpu", "--type", "process")
        cli(prefect, "concurrency-limit", "create", "gpu", "1")
        background.append(
            subprocess.Popen([prefect, "worker", "start", "--pool", "xai-gpu"], cwd=tmp_path, env=env, **quiet)
        )
        cli(sys.executable, "-m", "xai_audit.flows.cli", "deploy")
        run_deployed_audit(cli, config, results)
        store = ResultsStore(results)
        (run_id,) = store.run_ids()
        return {
            "status": RunRecord.load(store, run_id).status,
            "images": len(store.read("predictions", run_id)),
            "gaps": gpu_task_gaps(api_url),
        }
    finally:
        for process in reversed(background):
            stop(process)


def test_the_deployed_audit_runs_on_a_postgresql_backed_prefect_next_to_sqlite(tmp_path):
    with postgres() as database_url:
        on_postgres = deployed_audit(tmp_path / "postgresql", database_url)
    on_sqlite = deployed_audit(tmp_path / "sqlite", f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}")
    for outcome in (on_postgres, on_sqlite):
        assert outcome["status"] == "completed" and outcome["images"] == N_IMAGES
        assert len(outcome["gaps"]) >= N_IMAGES - 1  # every chunk ran as a gpu-tagged task
    summary = {
        name: {
            "gpu_tasks": len(outcome["gaps"]) + 1,
            "mean_gap_s": round(float(np.mean(outcome["gaps"])), 2),
            "max_gap_s": round(float(np.max(outcome["gaps"])), 2),
        }
        for name, outcome in (("postgresql", on_postgres), ("sqlite", on_sqlite))
    }
    print("gap between consecutive gpu tasks:", json.dumps(summary))
