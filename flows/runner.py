"""Task runners: a thread pool in the flow's process, or one Dask cluster per flow run.

With ``runner.kind: dask`` the audit flow's task runner owns the cluster (a ``LocalCluster`` of
worker processes it starts, or the scheduler at ``runner.address``); its subflows attach to that
scheduler by address instead of starting clusters of their own. Tasks tagged ``gpu`` ask Dask for
one ``GPU`` resource when the cluster's workers advertise it (``dask worker --resources GPU=1``),
so the scheduler puts one of them on each GPU at a time; on a cluster whose workers advertise no
GPU they run anywhere, since a resource nobody offers would leave them waiting forever.

Both runners hand Prefect the ``gpu`` tag only while the API enforces a concurrency limit on it
(:func:`gpu_limit_enforced`), and runs against an ephemeral API send no flow-run heartbeats
(:func:`local_run_settings`): two Prefect 3.x costs that a run would otherwise pay for nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import dask
import distributed
from prefect import Flow, Task
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext, SettingsContext, get_settings_context
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from xai_audit.tasks.core.config import AuditConfig

GPU_TAG = "gpu"
GPU_RESOURCE = "GPU"


def gpu_limit_enforced() -> bool:
    """Whether the Prefect API holds an active concurrency limit on the ``gpu`` tag.

    Prefect asks the API for a slot on every tag of a task at each task start. Without a limit
    that check is free only for 5 s after the previous one (the client caches "no limit"); after
    that, on a SQLite-backed API (the ephemeral one included) the server's read-then-write
    transaction fails with "database is locked" whenever another write lands in between, which
    is usual while task states are being recorded, and the client retries after ~2 s: measured
    here, almost every start of a 6 s task and one start in 5 s of shorter ones. An API that
    cannot be asked counts as enforcing, so the tag is kept.
    """
    try:
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(f"tag:{GPU_TAG}")
    except ObjectNotFound:
        return False
    except Exception:  # noqa: BLE001 - unreachable or older API: keep the tag, Prefect reports the rest
        return True
    return bool(limit.active)


class GpuTagPolicy:
    """Mixin for task runners: submit ``gpu``-tagged tasks without the tag unless a limit enforces it.

    Asked once per runner (one flow run); a limit created later applies from the next flow run.
    """

    _gpu_enforced: bool | None = None

    def _tag_policy(self, task: Task) -> Task:
        if GPU_TAG not in task.tags:
            return task
        if self._gpu_enforced is None:
            self._gpu_enforced = gpu_limit_enforced()
        if self._gpu_enforced:
            return task
        return task.with_options(tags=set(task.tags) - {GPU_TAG})


class AuditThreadPoolTaskRunner(GpuTagPolicy, ThreadPoolTaskRunner):
    """Prefect's thread-pool runner with the ``gpu`` tag policy of :class:`GpuTagPolicy`."""

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        return super().submit(self._tag_policy(task), parameters, wait_for, dependencies)


class GpuDaskTaskRunner(GpuTagPolicy, DaskTaskRunner):
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
        needs_gpu = GPU_TAG in task.tags and self.cluster_has_gpus()
        with dask.annotate(resources={GPU_RESOURCE: 1}) if needs_gpu else nullcontext():
            return super().submit(self._tag_policy(task), parameters, wait_for, dependencies)


def flow_task_runner(config: AuditConfig) -> TaskRunner:
    """The task runner of the audit flow: it owns the Dask cluster when the config asks for one."""
    runner = config.runner
    if runner.kind == "thread":
        return AuditThreadPoolTaskRunner(max_workers=runner.workers)
    # Dask logs every client connection and worker retirement at INFO: noise in an audit's log.
    distributed_log = logging.getLogger("distributed")
    distributed_log.setLevel(max(distributed_log.getEffectiveLevel(), logging.WARNING))
    if runner.address:
        return GpuDaskTaskRunner(address=runner.address)
    cluster_kwargs: dict[str, Any] = {
        "n_workers": runner.n_workers,
        "threads_per_worker": runner.threads_per_worker,
        "processes": True,
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


_THREAD_FLOWS: dict[tuple[int, int], Flow] = {}


def with_task_runner(flow: Flow, runner: TaskRunner) -> Flow:
    """``flow`` running its tasks on ``runner``: what ``flow.with_options(task_runner=runner)`` gives.

    ``with_options`` builds a new Flow, which re-derives the parameter schema from the signature:
    ~0.1 s for a flow taking an AuditConfig, paid by every flow and subflow call of a run. A flow
    run enters a duplicate of its runner, so a thread-pool variant is kept per flow and worker
    count and reused; Dask runners carry a cluster address and are built each time.
    """
    if type(runner) is not AuditThreadPoolTaskRunner:
        return flow.with_options(task_runner=runner)
    key = (id(flow), runner._max_workers)
    if key not in _THREAD_FLOWS:
        _THREAD_FLOWS[key] = flow.with_options(task_runner=runner)
    return _THREAD_FLOWS[key]


_QUIET_SETTINGS: list = []  # [(settings, the same without heartbeats)]: the last copy made


@contextmanager
def local_run_settings() -> Iterator[None]:
    """Prefect settings for flows run in this process: no flow-run heartbeats on an ephemeral API.

    Heartbeats let a long-lived server mark a run whose process died as crashed; an ephemeral
    API stops with this process, so nobody reads them. Their thread sleeps in 1 s steps and is
    joined when each flow run ends, which costs up to 1 s per flow run (Prefect 3.9,
    ``flow_engine._send_heartbeats``). Against a configured ``PREFECT_API_URL`` nothing changes;
    the private server a CLI run owns (``xai_audit.flows.prefect_api``) counts as ephemeral.
    """
    if PREFECT_API_URL.value() and not os.environ.get("XAI_AUDIT_PRIVATE_API"):
        yield
        return
    # what temporary_settings does, without re-validating every Prefect setting (~0.1 s) each time
    context = get_settings_context()
    if not _QUIET_SETTINGS or _QUIET_SETTINGS[0][0] is not context.settings:
        quiet = context.settings.copy_with_update(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
        _QUIET_SETTINGS[:] = [(context.settings, quiet)]
    with SettingsContext(profile=context.profile, settings=_QUIET_SETTINGS[0][1]):
        yield


__all__ = [
    "AuditThreadPoolTaskRunner",
    "GpuDaskTaskRunner",
    "GpuTagPolicy",
    "flow_task_runner",
    "gpu_limit_enforced",
    "local_run_settings",
    "subflow_task_runner",
    "with_task_runner",
    "GPU_TAG",
    "GPU_RESOURCE",
]
