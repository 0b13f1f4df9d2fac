"""Scale-out with prefect-dask: one cluster per flow run, GPU resource annotations, same tables as threads."""

from __future__ import annotations

from pathlib import Path

import distributed
import pytest
import torch
import yaml
from distributed.worker import thread_state
from PIL import Image
from prefect import flow, task

from xai_audit.flows.audit import run_audit
from xai_audit.flows.runner import GpuDaskTaskRunner, flow_task_runner
from xai_audit.storage.parquet import ResultsStore
from xai_audit.storage.schemas import ALL_TABLES
from xai_audit.tasks.core.config import ConfigErrors, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]

# Columns that differ between two runs of one config by nature: identity, clocks, the runner itself.
RUN_SPECIFIC = {
    "run_id",
    "started_at",
    "finished_at",
    "timings_json",
    "seconds",
    "seconds_mean",
    "config_json",
    "hostname",
    "pid",
}
N_IMAGES = 4


def small_audit(runner: dict) -> dict:
    return {
        "name": "dask-check",
        "device": "cpu",
        "runner": runner,
        "world": {"n_train": 1, "n_val": N_IMAGES},
        "models": [
            {
                "name": "tiny",
                "source": "python",
                "callable": "tests.fixtures.tiny_models:tiny_resnet",
                "num_classes": 3,
                "preprocess": {"resize": 64, "crop": 64},
                "layers": ["layer4"],
            }
        ],
        "dissect": {"methods": ["netdissect"], "probe": {"batch_size": N_IMAGES}},
        "explain": {"methods": ["gradcam", "eigencam"], "chunk_size": 1, "batch_size": 1, "metrics": {"steps": 4}},
    }


def test_an_address_needs_the_dask_runner():
    with pytest.raises(ConfigErrors, match="runner: .*address needs kind 'dask'"):
        parse_config({"runner": {"address": "tcp://127.0.0.1:8786"}})


def test_the_runner_connects_to_a_configured_scheduler_instead_of_starting_a_cluster():
    runner = flow_task_runner(parse_config({"runner": {"kind": "dask", "address": "tcp://10.0.0.5:8786"}}))
    assert isinstance(runner, GpuDaskTaskRunner)
    assert (runner.address, runner.cluster_class, runner.cluster_kwargs) == ("tcp://10.0.0.5:8786", None, {})


def resources_of_running_task() -> dict:
    """The Dask resources the scheduler reserved for the task running in this worker thread."""
    return dict(distributed.get_worker().state.tasks[thread_state.key].resource_restrictions or {})


@task(tags=["gpu"])
def gpu_task() -> dict:
    return resources_of_running_task()


@task
def cpu_task() -> dict:
    return resources_of_running_task()


@flow
def restrictions() -> tuple[dict, dict]:
    return gpu_task.submit().result(), cpu_task.submit().result()


@pytest.mark.parametrize(("resources", "expected"), [({"GPU": 1}, ({"GPU": 1}, {})), ({}, ({}, {}))])
def test_gpu_tasks_ask_for_a_gpu_only_where_workers_offer_one(prefect_harness, resources, expected):
    cluster_kwargs = {"n_workers": 1, "processes": False, "dashboard_address": None, "resources": resources}
    runner = GpuDaskTaskRunner(cluster_class=distributed.LocalCluster, cluster_kwargs=cluster_kwargs)
    assert restrictions.with_options(task_runner=runner)() == expected


class CountingCluster(distributed.LocalCluster):
    """A LocalCluster that records its instances and, when it closes, which task functions its scheduler ran."""

    instances: list[CountingCluster] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ran: dict[str, int] = {}
        CountingCluster.instances.append(self)

    def close(self, *args, **kwargs):
        if not self.ran:
            self.ran = {name: prefix.state_counts["memory"] for name, prefix in self.scheduler.task_prefixes.items()}
        return super().close(*args, **kwargs)


def comparable_rows(store: ResultsStore, table: str) -> list[tuple[str, ...]]:
    frame = store.read(table)
    frame = frame[[column for column in frame.columns if column not in RUN_SPECIFIC]]
    return sorted(tuple(repr(value) for value in row) for row in frame.itertuples(index=False))


@pytest.mark.slow
@pytest.mark.timeout(900)  # a cluster that never comes up or never closes fails the test instead of hanging CI
def test_a_two_process_local_cluster_writes_the_tables_of_the_thread_runner(prefect_harness, tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in Dask's worker processes, so float sums add up in the same order
    try:
        reference = run_audit(parse_config(small_audit({"kind": "thread"})), str(tmp_path / "threads"))
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # worker processes import the model's callable from tests.fixtures
    monkeypatch.setattr(distributed, "LocalCluster", CountingCluster)
    monkeypatch.setattr(CountingCluster, "instances", [])
    scaled = run_audit(parse_config(small_audit({"kind": "dask", "n_workers": 2})), str(tmp_path / "dask"))

    assert reference.status == scaled.status == "completed"
    (cluster,) = CountingCluster.instances  # one cluster for the flow and both subflows
    assert cluster.ran.get("explain_chunk") == N_IMAGES and cluster.ran.get("label_task") == 1, cluster.ran
    left, right = ResultsStore(tmp_path / "threads"), ResultsStore(tmp_path / "dask")
    for table in ("predictions", "saliency", "agreement", "faithfulness", "neurons"):
        assert len(comparable_rows(left, table)) > 0, table
    for table in ALL_TABLES:
        assert comparable_rows(left, table) == comparable_rows(right, table), table


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_worker_processes_load_a_model_file_beside_the_config_without_a_pythonpath(
    prefect_harness, tmp_path, monkeypatch
):
    """``mymodel.py:build`` travels as its absolute path: each worker process loads the file from there."""
    project = tmp_path / "project"
    (project / "photos").mkdir(parents=True)
    for index in range(2):
        Image.new("RGB", (40, 40), (60 * index, 90, 200)).save(project / "photos" / f"{index}.png")
    (project / "mymodel.py").write_text(
        "from torch import nn\n\n\ndef build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))\n"
    )
    config = {
        "name": "dask-file",
        "device": "cpu",
        "runner": {"kind": "dask", "n_workers": 1},
        "models": [
            {
                "name": "mine",
                "source": "python",
                "callable": "mymodel.py:build",
                "class_names": ["a", "b"],
                "preprocess": {"resize": 32, "crop": 32},
            }
        ],
        "images": {"kind": "folder", "root": "photos"},
        "dissect": {"enabled": False},
        "explain": {"methods": ["gradcam"], "chunk_size": 1, "metrics": {"steps": 4}},
    }
    (project / "audit.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setattr(distributed, "LocalCluster", CountingCluster)
    monkeypatch.setattr(CountingCluster, "instances", [])
    outcome = run_audit(load_config(project / "audit.yaml"), str(tmp_path / "results"))

    assert outcome.status == "completed"
    (cluster,) = CountingCluster.instances
    assert cluster.ran.get("explain_chunk") == 2, cluster.ran  # the model was built in the worker process
    predictions = ResultsStore(tmp_path / "results").read("predictions", outcome.run_id)
    assert sorted(predictions["image_id"]) == ["0.png", "1.png"]
