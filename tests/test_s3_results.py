"""A results root in S3 (moto's server on 127.0.0.1 standing in for the object store)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
import yaml
from moto.server import ThreadedMotoServer
from PIL import Image

from tests.fixtures.audit_runs import kill_when_written
from xai_audit.flows.cli import main
from xai_audit.storage.parquet import ResultsStore
from xai_audit.storage.query import run_query
from xai_audit.storage.runs import RunRecord, list_runs
from xai_audit.tasks.explain.stage import EXPLAIN_TABLES

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class S3:
    env: dict[str, str]
    bucket: str


@pytest.fixture()
def s3(monkeypatch) -> S3:
    """An S3 server on loopback with a new empty bucket; the AWS settings that reach it are set in os.environ."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # instances made for an earlier server must not be reused
    bucket = f"audit-{uuid.uuid4().hex[:12]}"  # moto keeps buckets in process memory across servers
    s3fs.S3FileSystem().mkdir(bucket)
    try:
        yield S3(env, bucket)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def _error_row(item: str) -> dict:
    return {"stage": "explain", "item_id": item, "error_type": "ValueError", "message": "bad image", "model": "m"}


def test_units_written_to_a_bucket_are_listed_replaced_and_queried(s3):
    store = ResultsStore(f"s3://{s3.bucket}/audits")
    store.write("errors", "r1", "chunk-0", [_error_row("a.png")])
    store.write("errors", "r1", "chunk-1", [_error_row("b.png"), _error_row("c.png")])
    store.write("errors", "r1", "chunk-1", [_error_row("b.png")])  # re-running a unit replaces its file
    assert store.files("errors") == [
        f"{s3.bucket}/audits/errors/run_id=r1/chunk-0.parquet",
        f"{s3.bucket}/audits/errors/run_id=r1/chunk-1.parquet",
    ]
    assert store.has_unit("errors", "r1", "chunk-0") and not store.has_unit("errors", "r1", "chunk-2")
    assert sorted(store.read("errors")["item_id"]) == ["a.png", "b.png"]
    assert run_query(store, "select count(*) as n from errors where run_id = 'r1'")["n"].tolist() == [2]


def test_files_written_by_another_process_are_seen_at_once(s3):
    store = ResultsStore(f"s3://{s3.bucket}/audits")
    store.write("errors", "r1", "chunk-0", [_error_row("a.png")])
    assert len(store.files("errors", "r1")) == 1 and not store.has_unit(
        "errors", "r1", "chunk-1"
    )  # listings now cached
    other = s3fs.S3FileSystem(skip_instance_cache=True)  # a Dask worker or a concurrent run: its own client
    with (
        other.open(f"{s3.bucket}/audits/errors/run_id=r1/chunk-1.parquet", "wb") as handle,
        store.fs.open(store.files("errors", "r1")[0], "rb") as source,
    ):
        handle.write(source.read())
    assert store.has_unit("errors", "r1", "chunk-1")
    assert len(store.files("errors", "r1")) == 2 and len(store.read("errors", "r1")) == 2


def test_the_runs_manifest_lives_in_the_bucket(s3):
    store = ResultsStore(f"s3://{s3.bucket}/audits")
    record = RunRecord(run_id="r1", config_name="c", config_json="{}", config_hash="h", device="cpu")
    record.save(store)
    record.status = "completed"
    record.save(store)
    assert RunRecord.load(store, "r1").status == "completed"
    assert list_runs(store)["run_id"].tolist() == ["r1"]


def _write_setup(tmp_path: Path, n_images: int) -> Path:
    rng = np.random.default_rng(0)
    for index in range(n_images):
        folder = tmp_path / "images" / CLASSES[index % 3]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"img{index:03d}.png")
    config = tmp_path / "s3.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "s3-demo",
                "models": [
                    {
                        "name": "tiny",
                        "source": "python",
                        "callable": "tests.fixtures.slow_models:slow_tiny_resnet",
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


@pytest.mark.slow
def test_a_run_killed_while_writing_to_s3_resumes_there_and_is_queried(s3, tmp_path, capsys):
    n_images = 8
    config = _write_setup(tmp_path, n_images)
    root = f"s3://{s3.bucket}/nightly"
    store = ResultsStore(root)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env |= s3.env | {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "xai_audit.flows.cli", "run", str(config), "--results", root]
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    kill_when_written(process, store, "errors", 2)  # errors is each chunk's last file
    (killed,) = store.run_ids()
    assert RunRecord.load(store, killed).status == "running"
    assert len(store.files("errors", killed)) < n_images, "the run finished before it could be killed"

    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"run {killed}: completed" in resumed.stdout
    assert store.run_ids() == [killed] and RunRecord.load(store, killed).status == "completed"
    for table in EXPLAIN_TABLES:
        for path in store.files(table, killed):
            with store.fs.open(path, "rb") as handle:
                pq.read_table(handle)  # every object is a whole Parquet file
    predictions, saliency = store.read("predictions", killed), store.read("saliency", killed)
    expected = sorted(f"{CLASSES[i % 3]}/img{i:03d}.png" for i in range(n_images))
    assert sorted(predictions["image_id"]) == expected and sorted(saliency["image_id"]) == expected

    capsys.readouterr()
    assert main(["query", "--results", root, "--format", "json", "select count(*) as n from saliency"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": n_images}]
