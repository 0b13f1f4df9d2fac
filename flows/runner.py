"""Task runners: a thread pool in the flow's process, or one Dask cluster per flow run.

With ``runner.kind: dask`` the audit flow's task runner owns the cluster (a ``LocalCluster`` of
worker processes it starts, or the scheduler at ``runner.address``); its subflows attach to that
scheduler by address instead of starting clusters of their own. Tasks tagged ``gpu`` ask Dask for
one ``GPU`` resource when the cluster's workers advertise it (``dask worker --resources GPU=1``),
so the scheduler puts one of them on each GPU at a time; on a cluster whose workers advertise no
GPU they run anywhere, since a resource nobody offers would leave them waiting forever.
"""
from __future__ import annotations

import logging
from typing import Any

import dask
import distributed
from prefect.context import FlowRunContext
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from flows.config import AuditConfig

GPU_TAG = "gpu"
GPU_RESOURCE = "GPU"


class GpuDaskTaskRunner(DaskTaskRunner):
    """prefect-dask's runner, annotating ``gpu``-tagged tasks with ``resources={"GPU": 1}`` on GPU clusters."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._has_gpus: bool | None = None

    def cluster_has_gpus(self) -> bool:
        """Whether any worker of the cluster advertises a ``GPU`` resource (asked once per runner)."""
        if self._has_gpus is None:
            workers = self.client.scheduler_info(n_workers=-1)["workers"].values()
            self._has_gpus = any(worker.get("resources", {}).get(GPU_RESOURCE, 0) > 0 for worker in workers)
        return self._has_gpus

    def scheduler_address(self) -> str:
        """The scheduler this runner talks to (starting its cluster if it has not yet)."""
        return self.client.scheduler.address

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        if GPU_TAG in task.tags and self.cluster_has_gpus():
            with dask.annotate(resources={GPU_RESOURCE: 1}):
                return super().submit(task, parameters, wait_for, dependencies)
        return super().submit(task, parameters, wait_for, dependencies)


def flow_task_runner(config: AuditConfig) -> TaskRunner:
    """The task runner of the audit flow: it owns the Dask cluster when the config asks for one."""
    runner = config.runner
    if runner.kind == "thread":
        return ThreadPoolTaskRunner(max_workers=runner.workers)
    # Dask logs every client connection and worker retirement at INFO: noise in an audit's log.
    distributed_log = logging.getLogger("distributed")
    distributed_log.setLevel(max(distributed_log.getEffectiveLevel(), logging.WARNING))
    if runner.address:
        return GpuDaskTaskRunner(address=runner.address)
    cluster_kwargs: dict[str, Any] = {
        "n_workers": runner.n_workers, "threads_per_worker": runner.threads_per_worker, "processes": True,
        "dashboard_address": None,
    }
    if runner.worker_resources:
        cluster_kwargs["resources"] = dict(runner.worker_resources)
    return GpuDaskTaskRunner(cluster_class=distributed.LocalCluster, cluster_kwargs=cluster_kwargs)


def subflow_task_runner(config: AuditConfig) -> TaskRunner:
    """The task runner of a subflow: attached to the running flow's Dask cluster, or a thread pool."""
    context = FlowRunContext.get()
    current = context.task_runner if context else None
    if isinstance(current, GpuDaskTaskRunner):
        return GpuDaskTaskRunner(address=current.scheduler_address())
    return flow_task_runner(config)


__all__ = ["GpuDaskTaskRunner", "flow_task_runner", "subflow_task_runner", "GPU_TAG", "GPU_RESOURCE"]
