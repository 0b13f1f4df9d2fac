"""Per-run Prefect costs that are ours: flows with a thread-pool runner are built once per worker
count, and the no-heartbeat settings follow whatever settings are current when a run starts."""

from __future__ import annotations

from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    PREFECT_LOGGING_LEVEL,
    temporary_settings,
)

from xai_audit.flows.explain import explain_model
from xai_audit.flows.runner import AuditThreadPoolTaskRunner, local_run_settings, with_task_runner


def test_thread_runner_flows_are_built_once_per_worker_count():
    one = with_task_runner(explain_model, AuditThreadPoolTaskRunner(max_workers=1))
    assert with_task_runner(explain_model, AuditThreadPoolTaskRunner(max_workers=1)) is one
    two = with_task_runner(explain_model, AuditThreadPoolTaskRunner(max_workers=2))
    assert two is not one and two.task_runner.duplicate()._max_workers == 2
    assert one.task_runner.duplicate()._max_workers == 1 and one.fn is explain_model.fn


def test_local_run_settings_drop_heartbeats_and_keep_every_other_current_setting():
    with temporary_settings(updates={PREFECT_API_URL: None}, restore_defaults={PREFECT_API_URL}):
        for level in ("DEBUG", "ERROR", "ERROR"):  # a changed outer setting is seen, an unchanged one reused
            with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30, PREFECT_LOGGING_LEVEL: level}):
                with local_run_settings():
                    assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() is None
                    assert PREFECT_LOGGING_LEVEL.value() == level
                assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() == 30
