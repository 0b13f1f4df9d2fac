"""Orchestration: OOM back-off, Prefect retries, automatic resume after a crash, concurrent runs."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

import xai_audit.flows.explain
import xai_audit.tasks.explain.stage
import xai_audit.tasks.explain.tasks
from tests.fixtures.audit_runs import kill_when_written
from xai_audit.flows.audit import interrupted_run, open_run, run_audit
from xai_audit.storage.parquet import ResultsStore
from xai_audit.storage.runs import RunRecord
from xai_audit.tasks.compute.oom import is_out_of_memory, run_with_backoff
from xai_audit.tasks.core.config import parse_config
from xai_audit.tasks.explain.stage import EXPLAIN_TABLES

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c"]


def fits_up_to(
    limit: int, error: type[Exception] = RuntimeError, message: str = "CUDA out of memory. Tried to allocate 2.00 GiB"
):
    """A batch function that runs out of memory above ``limit`` items and records the sizes it saw."""
    seen = []

    def function(batch):
        seen.append(len(batch))
        if len(batch) > limit:
            raise error(message)
        return list(batch)

    return function, seen


def test_out_of_memory_halves_the_batch_and_keeps_every_item(caplog):
    function, seen = fits_up_to(3)
    with caplog.at_level(logging.WARNING, logger="xai_audit.tasks.compute.oom"):
        batches = run_with_backoff(function, list(range(10)), 8)
    assert [item for batch in batches for item in batch] == list(range(10))
    assert seen == [8, 4, 2, 2, 2, 2, 2]
    assert "out of memory on a batch of 8; retrying with batches of 4" in caplog.text
    assert "batches of 2" in caplog.text


def test_cuda_out_of_memory_error_is_recognised():
    function, seen = fits_up_to(1, torch.cuda.OutOfMemoryError, "CUDA out of memory")
    assert [len(batch) for batch in run_with_backoff(function, list(range(3)), 4)] == [1, 1, 1]
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("x")) and not is_out_of_memory(ValueError("out of memory"))


def test_a_batch_of_one_that_does_not_fit_fails():
    function, seen = fits_up_to(0)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_with_backoff(function, list(range(3)), 4)
    assert seen == [3, 1]


def test_other_runtime_errors_are_not_retried():
    function, seen = fits_up_to(0, message="shape mismatch")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_with_backoff(function, list(range(3)), 4)
    assert seen == [3]


@pytest.fixture()
def image_folder(tmp_path):
    return make_images(tmp_path / "images", 7)


def make_images(folder: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    for index in range(count):
        target = folder / CLASSES[index % 3]
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(target / f"img{index:03d}.png")
    return folder


def tiny_config(image_folder, name="orchestration", **explain):
    return parse_config(
        {
            "name": name,
            "models": [
                {
                    "name": "tiny",
                    "source": "python",
                    "callable": "tests.fixtures.tiny_models:tiny_resnet",
                    "class_names": CLASSES,
                    "preprocess": {"resize": 64, "crop": 64},
                }
            ],
            "images": {"kind": "folder", "root": str(image_folder)},
            "dissect": {"enabled": False},
            "explain": {"methods": ["gradcam"], "chunk_size": 3, "batch_size": 3, "topk": 2, **explain},
        }
    )


def test_explain_chunk_backs_off_on_out_of_memory_and_writes_full_tables(
    prefect_harness, image_folder, tmp_path, monkeypatch
):
    real, sizes = xai_audit.tasks.explain.stage.explain_batch, []

    def explain_batch(config, model, layer, inputs, *concept_layers):
        sizes.append(len(inputs))
        if len(inputs) > 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(config, model, layer, inputs, *concept_layers)

    monkeypatch.setattr(xai_audit.tasks.explain.stage, "explain_batch", explain_batch)
    results = str(tmp_path / "results")
    outcome = run_audit(tiny_config(image_folder), results)
    predictions = ResultsStore(results).read("predictions", outcome.run_id)
    assert outcome.status == "completed"
    assert sorted(predictions["image_id"]) == sorted(f"{CLASSES[i % 3]}/img{i:03d}.png" for i in range(7))
    assert 3 in sizes and 1 in sizes


def test_a_transient_task_failure_is_retried_and_the_run_completes(
    prefect_harness, image_folder, tmp_path, monkeypatch
):
    real, calls = xai_audit.tasks.explain.tasks.explain_records, []

    def explain_records(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("flaky storage (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(xai_audit.tasks.explain.tasks, "explain_records", explain_records)
    # same task, no wait between attempts
    monkeypatch.setattr(
        xai_audit.flows.explain,
        "explain_chunk",
        xai_audit.tasks.explain.tasks.explain_chunk.with_options(retry_delay_seconds=0),
    )
    results = str(tmp_path / "results")
    outcome = run_audit(tiny_config(image_folder), results)
    store = ResultsStore(results)
    assert outcome.status == "completed" and RunRecord.load(store, outcome.run_id).status == "completed"
    assert len(calls) == 4  # 3 chunks, one of them twice
    assert len(store.read("predictions", outcome.run_id)) == 7 and len(store.read("saliency", outcome.run_id)) == 7


def _record(config, status, pid=None, hostname=None, run_id="r"):
    return RunRecord(
        run_id=run_id,
        config_name=config.name,
        config_json=config.canonical_json(),
        config_hash=config.config_hash(),
        device="cpu",
        status=status,
        pid=pid,
        hostname=hostname or socket.gethostname(),
    )


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize(
    ("status", "alive", "resumed"),
    [
        ("failed", True, True),
        ("running", False, True),
        ("running", True, False),
        ("completed", False, False),
        ("partial", False, False),
    ],
)
def test_only_failed_runs_and_runs_whose_process_died_are_resumed(image_folder, tmp_path, status, alive, resumed):
    store, config = ResultsStore(tmp_path / "results"), tiny_config(image_folder)
    _record(config, status, pid=os.getpid() if alive else _dead_pid()).save(store)
    assert interrupted_run(store, config) == ("r" if resumed else None)


def test_runs_of_another_config_or_another_host_are_not_resumed(image_folder, tmp_path):
    store, config = ResultsStore(tmp_path / "results"), tiny_config(image_folder)
    _record(config, "running", pid=_dead_pid(), hostname="elsewhere").save(store)
    assert interrupted_run(store, config) is None
    assert interrupted_run(store, tiny_config(image_folder, topk=3)) is None


def test_open_run_resumes_automatically_unless_new(image_folder, tmp_path):
    store, config = ResultsStore(tmp_path / "results"), tiny_config(image_folder)
    _record(config, "failed", run_id="old").save(store)
    fresh = open_run(store, config, None, new=True)
    assert fresh.run_id != "old"
    fresh.status = "completed"
    fresh.save(store)
    assert open_run(store, config, None).run_id != "old"  # the newest run of the config completed
    _record(config, "failed", run_id="zz-newest").save(store)
    resumed = open_run(store, config, None)
    assert (resumed.run_id, resumed.status, resumed.pid) == ("zz-newest", "running", os.getpid())


# ---- crash and concurrency, through real `xai-audit run` processes ----


def _cli_setup(tmp_path: Path, n_images: int, slow: bool) -> Path:
    make_images(tmp_path / "images", n_images)
    model = "tests.fixtures.slow_models:slow_tiny_resnet" if slow else "tests.fixtures.tiny_models:tiny_resnet"
    config = tmp_path / "crash.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "crash",
                "models": [
                    {
                        "name": "tiny",
                        "source": "python",
                        "callable": model,
                        "class_names": CLASSES,
                        "preprocess": {"resize": 64, "crop": 64},
                    }
                ],
                "images": {"kind": "folder", "root": "images"},
                "dissect": {"enabled": False},
                "explain": {"methods": ["gradcam"], "chunk_size": 1, "batch_size": 1},
            }
        )
    )
    return config


def _cli_env(tmp_path: Path, home: str) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / home)
    return env


def _cli(config: Path, results: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "xai_audit.flows.cli", "run", str(config), "--results", str(results), *extra]


def _tables(store: ResultsStore, run_id: str) -> dict[str, pd.DataFrame]:
    frames = {}
    for table in ("predictions", "saliency", "agreement", "faithfulness"):
        frame = store.read(table, run_id).drop(columns="run_id")
        keys = [column for column in ("image_id", "method", "method_a", "method_b") if column in frame]
        frames[table] = frame.sort_values(keys).reset_index(drop=True)
    return frames


def _assert_intact(store: ResultsStore, run_id: str, n_images: int) -> dict[str, pd.DataFrame]:
    for table in EXPLAIN_TABLES:
        for path in store.files(table, run_id):
            pq.read_table(path)  # every file readable
    frames = _tables(store, run_id)
    assert len(frames["predictions"]) == n_images and not frames["predictions"]["image_id"].duplicated().any()
    assert len(frames["saliency"]) == n_images
    assert RunRecord.load(store, run_id).status == "completed"
    return frames


def _assert_same(left: dict[str, pd.DataFrame], right: dict[str, pd.DataFrame]) -> None:
    for table in left:
        pd.testing.assert_frame_equal(left[table].map(repr), right[table].map(repr), obj=table)


@pytest.mark.slow
def test_a_killed_run_resumes_automatically_to_the_tables_of_an_uninterrupted_run(tmp_path):
    n_images = 12
    config = _cli_setup(tmp_path, n_images, slow=True)
    results = tmp_path / "results"
    store = ResultsStore(results)
    env = _cli_env(tmp_path, "prefect-home")
    process = subprocess.Popen(
        _cli(config, results), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    kill_when_written(process, store, "errors", 3)  # errors is each chunk's last file
    (killed,) = store.run_ids()
    assert RunRecord.load(store, killed).status == "running"
    done_before = len(store.files("errors", killed))
    assert done_before < n_images, "the run finished before it could be killed"

    resumed = subprocess.run(_cli(config, results), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"run {killed}: completed" in resumed.stdout
    reference = subprocess.run(
        _cli(config, results, "--new"), cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert reference.returncode == 0, reference.stderr
    (fresh,) = set(store.run_ids()) - {killed}
    _assert_same(_assert_intact(store, killed, n_images), _assert_intact(store, fresh, n_images))


@pytest.mark.slow
def test_two_runs_writing_to_one_results_root_at_once_both_complete(tmp_path):
    n_images = 6
    config = _cli_setup(tmp_path, n_images, slow=False)
    results = tmp_path / "results"
    processes = [
        subprocess.Popen(
            _cli(config, results, "--new"),
            cwd=REPO,
            env=_cli_env(tmp_path, f"home{i}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    store = ResultsStore(results)
    first, second = store.run_ids()
    _assert_same(_assert_intact(store, first, n_images), _assert_intact(store, second, n_images))
