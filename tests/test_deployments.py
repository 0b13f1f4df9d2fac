"""Deployments end to end against real Prefect servers on loopback: server, work pool, worker, deploy, run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from xai_audit.storage.parquet import ResultsStore
from xai_audit.storage.runs import RunRecord

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(api_url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "prefect server exited"
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no healthy Prefect API at {api_url} after {timeout} s")


def stop(process: subprocess.Popen) -> None:
    """Interrupt a process group, then kill it if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def server_environment(tmp_path: Path, api_url: str, database_url: str) -> dict[str, str]:
    """This environment without the developer's Prefect settings, for a server on ``database_url``
    at ``api_url`` and its clients, with a Prefect home under ``tmp_path``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_DATABASE_CONNECTION_URL=database_url,
    )
    return env


def run_deployed_audit(cli, config: Path, results: Path) -> None:
    """``prefect deployment run`` of the ad-hoc deployment, watched until it ends; it must complete."""
    run = cli(
        str(BIN / "prefect"),
        "deployment",
        "run",
        "xai-audit-deployment/audit",
        "--param",
        f"config_path={config}",
        "--param",
        f"results={results}",
        "--watch",
        "--watch-timeout",
        "400",
        timeout=450,
    )
    assert "Completed" in run.stdout, run.stdout


@pytest.mark.slow
def test_deployed_audit_runs_on_a_worker_and_the_nightly_schedule_is_registered(tmp_path):
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for index in range(4):
        (images / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / "a" / f"{index}.png")
    config = tmp_path / "deployed.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "deployed",
                "models": [
                    {
                        "name": "tiny",
                        "source": "python",
                        "callable": "tests.fixtures.tiny_models:tiny_resnet",
                        "class_names": ["a", "b", "c"],
                        "preprocess": {"resize": 64, "crop": 64},
                    }
                ],
                "images": {"kind": "folder", "root": str(images)},
                "dissect": {"enabled": False},
                "explain": {"methods": ["gradcam"], "chunk_size": 2},
            }
        )
    )
    results = tmp_path / "results"
    api_url = f"http://127.0.0.1:{free_port()}/api"
    env = server_environment(tmp_path, api_url, f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}")
    port = api_url.split(":")[2].split("/")[0]

    def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        done = subprocess.run(list(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{args}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    background = []
    try:
        server = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        background.append(server)
        wait_healthy(api_url, server)
        cli(str(BIN / "prefect"), "work-pool", "create", "xai-gpu", "--type", "process")
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "xai-gpu"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        background.append(worker)
        cli(sys.executable, "-m", "xai_audit.flows.cli", "deploy")
        run_deployed_audit(cli, config, results)
        store = ResultsStore(results)
        (run_id,) = store.run_ids()
        assert RunRecord.load(store, run_id).status == "completed"
        assert sorted(store.read("predictions", run_id)["image_id"]) == [f"a/{index}.png" for index in range(4)]
        nightly = cli(str(BIN / "prefect"), "deployment", "inspect", "xai-audit-deployment/nightly-audit").stdout
        assert "0 2 * * *" in nightly and "xai-gpu" in nightly

        served = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xai_audit.flows.cli",
                "serve",
                str(config),
                "--cron",
                "*/30 * * * *",
                "--name",
                "served",
                "--results",
                str(results),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        background.append(served)
        deadline = time.monotonic() + 120
        while True:
            found = subprocess.run(
                [str(BIN / "prefect"), "deployment", "inspect", "xai-audit-deployment/served"],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            if found.returncode == 0 and "*/30 * * * *" in found.stdout:
                break
            assert served.poll() is None and time.monotonic() < deadline, found.stdout + found.stderr
            time.sleep(1)
    finally:
        for process in reversed(background):
            stop(process)
