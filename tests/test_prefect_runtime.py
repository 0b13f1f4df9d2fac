"""Two Prefect 3.x costs the task runners avoid: tag-slot checks nobody enforces, heartbeats nobody reads."""

from __future__ import annotations

import os

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.context import TaskRunContext
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    get_current_settings,
    temporary_settings,
)

import xai_audit.flows.runner as runner
from xai_audit.flows.runner import (
    GPU_TAG,
    AuditThreadPoolTaskRunner,
    flow_task_runner,
    gpu_limit_enforced,
    local_run_settings,
)
from xai_audit.tasks.core.config import parse_config


@task(tags=[GPU_TAG, "probe"])
def tags_of_this_run() -> list[str]:
    return sorted(TaskRunContext.get().task_run.tags)


@flow
def submit_one() -> list[str]:
    return tags_of_this_run.submit().result()


def run_tags() -> list[str]:
    return submit_one.with_options(task_runner=flow_task_runner(parse_config({})))()


def test_the_thread_runner_is_the_audit_runner():
    assert isinstance(flow_task_runner(parse_config({"runner": {"workers": 3}})), AuditThreadPoolTaskRunner)


def test_the_gpu_tag_reaches_prefect_only_while_a_limit_enforces_it(prefect_harness):
    assert run_tags() == ["probe"]
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=4)
        try:
            assert gpu_limit_enforced()
            assert run_tags() == [GPU_TAG, "probe"]
            client.update_global_concurrency_limit(f"tag:{GPU_TAG}", GlobalConcurrencyLimitUpdate(active=False))
            assert not gpu_limit_enforced()
            assert run_tags() == ["probe"]
        finally:
            client.delete_concurrency_limit_by_tag(GPU_TAG)
    assert run_tags() == ["probe"]


def test_an_api_that_cannot_be_asked_keeps_the_tag(monkeypatch):
    def unreachable(**kwargs):
        raise ConnectionError("no API here")

    monkeypatch.setattr(runner, "get_client", unreachable)
    assert gpu_limit_enforced()


@pytest.mark.parametrize(("api_url", "heartbeats_off"), [(None, True), ("http://127.0.0.1:4200/api", False)])
def test_heartbeats_are_off_only_without_a_configured_api(api_url, heartbeats_off):
    default = PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value()
    assert default is not None
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        with local_run_settings():
            assert get_current_settings().flows.heartbeat_frequency == (None if heartbeats_off else default)
        assert get_current_settings().flows.heartbeat_frequency == default


PREFECT_CHOICES = ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH", "PREFECT_HOME")


def test_the_api_url_of_the_active_prefect_profile_is_used(tmp_path, monkeypatch):
    """A user whose Prefect profile points at a server keeps it: only without any configured API
    does a run take xai-audit's own Prefect home (xai_audit.flows.prefect_api)."""
    from xai_audit.flows import prefect_api

    home = tmp_path / "home"
    home.mkdir()
    (home / "profiles.toml").write_text(
        'active = "work"\n[profiles.work]\nPREFECT_API_URL = "http://prefect.internal:4200/api"\n[profiles.local]\n'
    )
    # configure_environment writes os.environ itself: give it a copy, so nothing leaks into later tests
    environ = {key: value for key, value in os.environ.items() if key not in PREFECT_CHOICES}
    monkeypatch.setattr(os, "environ", environ)
    monkeypatch.setenv("PREFECT_HOME", str(home))
    assert prefect_api.profile_api_url() == "http://prefect.internal:4200/api"
    assert prefect_api.configure_environment() == "http://prefect.internal:4200/api"
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setenv("PREFECT_PROFILE", "local")
    monkeypatch.delenv("PREFECT_HOME")
    monkeypatch.setenv("XAI_AUDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(prefect_api.Path, "home", lambda: home.parent)  # no profiles.toml under ~/.prefect
    assert prefect_api.configure_environment() is None
    assert os.environ["PREFECT_HOME"] == str(prefect_api.own_prefect_home())
    assert prefect_api.own_prefect_home().is_dir()
    assert os.environ is environ  # still the copy: the real environment was never written


@pytest.mark.parametrize(("version", "accepted"), [("2.19.3", False), ("3.1.0", True)])
def test_a_prefect_server_of_another_major_version_is_refused_in_one_line(version, accepted):
    """A configured API that answers /health but runs another major Prefect version is named, with
    both versions, before any work (exit 2 in the CLI); the same major version is used."""
    import http.server
    import json
    import threading

    from xai_audit.flows.prefect_api import ApiUnavailable, check_api

    class Server(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's hook name
            body = json.dumps(version if self.path.endswith("/admin/version") else True).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/api"
    try:
        if accepted:
            check_api(url)
        else:
            with pytest.raises(ApiUnavailable, match=f"runs Prefect {version}, this installation 3"):
                check_api(url)
    finally:
        httpd.shutdown()


def test_a_second_run_in_one_process_does_not_take_the_first_runs_stopped_server_for_a_configured_api(monkeypatch):
    """Prefect imported during a run keeps the private server's URL in its settings after the server
    is gone; the next in-process run must start its own server rather than check (and refuse) that URL."""
    import contextlib

    from xai_audit.flows import prefect_api

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    served = []

    @contextlib.contextmanager
    def fake_owned_api(wait: bool = True):
        url = f"http://127.0.0.1:{9000 + len(served)}/api"
        prefect_api._PRIVATE_URLS.add(url)
        served.append(url)
        yield url, lambda: None

    def refuse(url: str) -> None:
        raise prefect_api.ApiUnavailable(f"{url} is not reachable")

    monkeypatch.setattr(prefect_api, "owned_api", fake_owned_api)
    monkeypatch.setattr(prefect_api, "check_api", refuse)
    with temporary_settings(restore_defaults={PREFECT_API_URL}), prefect_api.api_for_run() as ready:  # none set
        ready()
    with temporary_settings(updates={PREFECT_API_URL: served[0]}):  # what Prefect's settings keep
        with prefect_api.api_for_run() as ready:
            ready()
    assert len(served) == 2
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:1/api"}):  # a configured API is checked
        with pytest.raises(prefect_api.ApiUnavailable), prefect_api.api_for_run():
            pass
