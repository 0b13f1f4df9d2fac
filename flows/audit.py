"""The audit flow: open a run, dissect and explain every model, summarize, close the run."""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import pandas as pd
from prefect import flow, get_run_logger

from xai_audit.flows.dissect import dissect_model
from xai_audit.flows.explain import explain_model
from xai_audit.flows.runner import (
    AuditThreadPoolTaskRunner,
    flow_task_runner,
    local_run_settings,
    subflow_task_runner,
    with_task_runner,
)
from xai_audit.storage.integrity import repair_run
from xai_audit.storage.parquet import ResultsStore
from xai_audit.storage.runs import RunRecord, list_runs, new_run_id
from xai_audit.tasks.compute.device import resolve_device
from xai_audit.tasks.compute.precision import describe_cpu_kernels, describe_precision
from xai_audit.tasks.core.config import AuditConfig, ConfigErrors, load_config
from xai_audit.tasks.data.image_sets import list_image_set
from xai_audit.tasks.dissect.tasks import probe_task
from xai_audit.tasks.results.summary import summarize_run
from xai_audit.tasks.results.tasks import summarize_task
from xai_audit.tasks.world.tasks import prepare_world

STAGES = ("dissect", "explain")


@dataclass(frozen=True)
class RunOutcome:
    """What a finished run reports back to its caller."""

    run_id: str
    status: str
    n_errors: int
    report_path: str | None = None


def process_alive(hostname: str, pid: int | None) -> bool:
    """Whether the process ``pid`` on ``hostname`` may still be running (another host: assume so)."""
    if pid is None or hostname != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def interrupted_run(store: ResultsStore, config: AuditConfig) -> str | None:
    """The newest run of this config (same name and hash) if it failed or its process died while running."""
    runs = list_runs(store)
    if runs.empty:
        return None
    runs = runs[(runs["config_name"] == config.name) & (runs["config_hash"] == config.config_hash())]
    if runs.empty:
        return None
    last = runs.iloc[0]
    pid = None if pd.isna(last["pid"]) else int(last["pid"])
    if last["status"] == "failed" or (last["status"] == "running" and not process_alive(last["hostname"], pid)):
        return str(last["run_id"])
    return None


def failure_message(error: BaseException) -> str:
    """What ``runs.message`` says about the exception that ended a run; a signal by its name
    (Prefect turns a SIGTERM inside a flow into ``TerminationSignal``, which has no message)."""
    signum = getattr(error, "signal", None) or getattr(error, "signum", None)
    if isinstance(signum, int):
        return f"stopped by {signal.Signals(signum).name}"
    return f"{type(error).__name__}: {error}"


def open_run(store: ResultsStore, config: AuditConfig, resume: str | None, new: bool = False) -> RunRecord:
    """A new run, or the run ``resume`` (same config required) set back to running.

    Without ``resume`` (and unless ``new``), the newest run of the same config is resumed when it
    failed or when it is marked running but its process is gone (killed, machine rebooted).
    """
    if resume is None and not new:
        resume = interrupted_run(store, config)
    if resume is None:
        record = RunRecord(
            run_id=new_run_id(config.name),
            config_name=config.name,
            config_json=config.canonical_json(),
            config_hash=config.config_hash(),
            device=str(resolve_device(config.device)),
        )
    else:
        try:
            record = RunRecord.load(store, resume)
        except KeyError as error:
            raise ConfigErrors([("--resume", str(error))]) from None
        if record.config_hash != config.config_hash():
            raise ConfigErrors(
                [
                    (
                        "--resume",
                        f"run {resume} was made with another config "
                        f"(hash {record.config_hash}, now {config.config_hash()})",
                    )
                ]
            )
        record.status, record.finished_at, record.message = "running", None, None
        record.hostname, record.pid = socket.gethostname(), os.getpid()
        repair_run(store, record.run_id)  # unreadable files are set aside, so their units count as missing
    record.precision = describe_precision(config.explain.precision, record.device, config.explain.methods)
    record.cpu_kernels = describe_cpu_kernels()
    record.save(store)
    return record


@flow(name="xai-audit", flow_run_name="audit {config.name}", task_runner=AuditThreadPoolTaskRunner(max_workers=1))
def audit(
    config: AuditConfig,
    results: str,
    stages: tuple[str, ...] = STAGES,
    resume: str | None = None,
    new: bool = False,
) -> RunOutcome:
    """Audit every configured model and record the run in the ``runs`` table."""
    store = ResultsStore(results)
    run = open_run(store, config, resume, new)
    logger = get_run_logger()
    logger.info("run %s (%s, %s, precision %s) -> %s", run.run_id, config.name, run.device, run.precision, results)
    try:
        prepare_world(config, stages)
        if "dissect" in stages and config.dissect.enabled:
            started = time.perf_counter()
            probe_task(config, results, run.run_id)
            for model in config.models:
                with_task_runner(dissect_model, subflow_task_runner(config))(config, model.name, results, run.run_id)
            run.timings["dissect"] = round(time.perf_counter() - started, 3)
        if "explain" in stages and config.explain.enabled:
            started = time.perf_counter()
            n_chunks = list_image_set(config, store, run.run_id)
            for model in config.models:
                with_task_runner(explain_model, subflow_task_runner(config))(
                    config, model.name, n_chunks, results, run.run_id
                )
            run.timings["explain"] = round(time.perf_counter() - started, 3)
        summary = summarize_task(results, run.run_id)
        run.n_errors = summary.n_errors
        run.status = "partial" if run.n_errors else "completed"
    except BaseException as error:
        run.status, run.message = "failed", failure_message(error)
        raise
    finally:
        run.finished_at = datetime.now(timezone.utc)
        run.save(store)
    return RunOutcome(run.run_id, run.status, run.n_errors, summary.report_path)


def run_audit(
    config: AuditConfig,
    results: str,
    stages: tuple[str, ...] = STAGES,
    resume: str | None = None,
    new: bool = False,
) -> RunOutcome:
    """Run the audit flow in this process (used by the CLI); see :func:`open_run` for which run it continues."""
    with local_run_settings():
        return with_task_runner(audit, flow_task_runner(config))(config, results, tuple(stages), resume, new)


@flow(name="xai-audit-deployment", flow_run_name="audit {config_path}")
def audit_from_file(config_path: str, results: str | None = None) -> dict:
    """Deployment entry point: parameters are a config path and an optional results root."""
    config = load_config(config_path)
    outcome = run_audit(config, results or config.results or "results")
    return outcome.__dict__


__all__ = ["audit", "run_audit", "audit_from_file", "summarize_run", "RunOutcome", "STAGES"]
