"""The Prefect API a command-line run talks to: the user's server, or a private one it owns.

Without a configured API, Prefect starts an *ephemeral* server on a SQLite file under its home
(``~/.prefect``). Two things go wrong with that on a real machine: another Prefect version that
runs there migrates the shared database under us (the next run fails at startup with an alembic
"Can't locate revision"), and a run killed by SIGKILL leaves the server behind, re-parented to
init. So a run without ``PREFECT_API_URL`` (neither in the environment nor in the active
Prefect profile) uses a Prefect home of its own, one per Prefect version under xai-audit's cache,
and a server process it starts and owns: that child asks the kernel to kill it when its parent
dies (``PR_SET_PDEATHSIG`` on Linux; elsewhere it polls its parent), and it is stopped when the
run ends. A configured API is checked once before any work: unreachable gives one line, exit 2.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

from xai_audit.tasks.core import progress
from xai_audit.tasks.core.cache import cache_root

try:
    import tomllib
except ImportError:  # Python 3.10: no profile file is read, the environment still is
    tomllib = None

STARTUP_TIMEOUT_S = 120.0
# What Prefect's own ephemeral server sets for its child (prefect.server.api.server.SubprocessASGIServer).
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


class ApiUnavailable(Exception):
    """The configured Prefect API cannot be used; the message says what and what to do."""


def own_prefect_home() -> Path:
    """xai-audit's Prefect home for this Prefect version: no other installation migrates it."""
    return cache_root() / "prefect" / metadata.version("prefect")


def profile_api_url(home: Path | None = None) -> str | None:
    """``PREFECT_API_URL`` of the active profile in the default Prefect home, if it sets one."""
    home = home or Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml")
    if tomllib is None:
        return None
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    url = profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")
    return str(url) if url else None


def configure_environment() -> str | None:
    """Before Prefect is imported: the configured API URL (environment or profile), or, when there
    is none, point ``PREFECT_HOME`` at xai-audit's own (unless the user chose one) and return None."""
    url = os.environ.get("PREFECT_API_URL") or profile_api_url()
    if url:
        os.environ["PREFECT_API_URL"] = url
        return url
    if not os.environ.get("PREFECT_HOME"):
        home = own_prefect_home()
        home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(home)
    return None


def check_api(url: str, timeout_s: float = 10.0) -> None:
    """Raise :class:`ApiUnavailable` unless ``url``'s ``/health`` answers 200."""
    import httpx

    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout_s)
    except httpx.HTTPError as error:
        raise ApiUnavailable(
            f"the Prefect API at {url} (PREFECT_API_URL) is not reachable ({type(error).__name__}); "
            "start that server, or unset PREFECT_API_URL to run on a private API"
        ) from None
    if response.status_code != 200:
        raise ApiUnavailable(
            f"the Prefect API at {url} (PREFECT_API_URL) answered {response.status_code} to /health; "
            "check that server, or unset PREFECT_API_URL to run on a private API"
        )
    try:
        server_version = str(httpx.get(f"{url.rstrip('/')}/admin/version", timeout=timeout_s).json())
    except (httpx.HTTPError, ValueError):
        return  # a server that does not say its version is given the benefit of the doubt
    client_version = metadata.version("prefect")
    if server_version.split(".")[0] != client_version.split(".")[0]:
        raise ApiUnavailable(
            f"the Prefect API at {url} (PREFECT_API_URL) runs Prefect {server_version}, this installation "
            f"{client_version}: use a Prefect {client_version.split('.')[0]}.x server, or unset PREFECT_API_URL "
            "to run on a private API"
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_PRIVATE_URLS: set[str] = set()
"""URLs of private servers this process started: Prefect imported during a run keeps the URL in its
settings after the server is gone, and a later run in the same process must not take it for a configured API."""


@contextlib.contextmanager
def api_for_run() -> Iterator[Callable[[], None]]:
    """The API a CLI run uses: the configured one once checked, else a private server it owns
    (``XAI_AUDIT_PRIVATE_API`` tells the runner it is private, like Prefect's ephemeral one).

    Yields ``ready``, which blocks until that API answers: the private server starts in the
    background, so the caller's imports and preflight checks run while it comes up (seconds of
    every run) instead of before it. Entered before Prefect is imported, the environment carries its URL.
    """
    url = os.environ.get("PREFECT_API_URL")
    if not url and "prefect" in sys.modules:  # a test harness sets only Prefect's setting
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
    if url and url not in _PRIVATE_URLS:
        check_api(url)
        yield lambda: None
        return

    with owned_api(wait=False) as (private_url, ready):  # started before Prefect is imported here
        # imported before the URL enters the environment: Prefect's root settings, read from it on
        # first import, would keep this server's URL after the run (a later run in the process)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        os.environ["PREFECT_API_URL"], os.environ["XAI_AUDIT_PRIVATE_API"] = private_url, "1"

        def announced_ready() -> None:  # said when a run needs it, not while preflight may still refuse
            progress.step("Prefect: private API server (home %s)", os.environ.get("PREFECT_HOME"))
            ready()

        try:
            with temporary_settings(updates={PREFECT_API_URL: private_url}):
                try:
                    yield announced_ready
                finally:
                    _flush_to_api()
        finally:
            del os.environ["PREFECT_API_URL"], os.environ["XAI_AUDIT_PRIVATE_API"]


def _flush_to_api(timeout_s: float = 10.0) -> None:
    """Send the log lines and events Prefect still queues while the private server is up: after it
    stops, Prefect's exit-time flush prints "Error logging to API" (a failed run's last lines)."""
    if "prefect.logging.handlers" not in sys.modules:  # nothing was logged to the API
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):  # noqa: BLE001 - a flush that fails must not mask the run's outcome
            worker.drain_all(timeout=timeout_s)


@contextlib.contextmanager
def owned_api(wait: bool = True) -> Iterator:
    """A private Prefect API server for this process's lifetime; yields its API URL once it answers,
    or with ``wait=False`` at once, as ``(url, ready)`` where ``ready()`` blocks until it answers.

    Waiting raises :class:`ApiUnavailable` with the server's last output if it does not come up.
    """
    import httpx

    port = _free_port()
    log_path = Path(os.environ.get("PREFECT_HOME") or own_prefect_home()) / "xai-audit-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "xai_audit.flows.prefect_api", str(port), str(os.getpid())],
            env={**os.environ, **SERVER_ENV},
            stdout=log,
            stderr=log,
        )
    url = f"http://127.0.0.1:{port}/api"
    _PRIVATE_URLS.add(url)
    answered: list[bool] = []

    def ready() -> None:
        if answered:
            return
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
                raise ApiUnavailable(
                    f"the private Prefect API server exited with code {process.returncode}"
                    + (f": {tail[0]}" if tail else "")
                    + f" (log: {log_path}); if another Prefect version migrated the database of PREFECT_HOME "
                    + f"({os.environ.get('PREFECT_HOME')}), unset PREFECT_HOME to use xai-audit's own"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise ApiUnavailable(f"the private Prefect API server did not answer within {STARTUP_TIMEOUT_S:.0f} s")
            time.sleep(0.1)
        answered.append(True)

    try:
        if wait:
            ready()
            yield url
        else:
            yield url, ready
    finally:
        _stop(process)


def _die_with_parent(parent_pid: int) -> None:
    """Make this process end when ``parent_pid`` does, even if the parent is SIGKILLed."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:  # for platforms without PR_SET_PDEATHSIG
        while os.getppid() == parent_pid:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def serve(port: int, parent_pid: int) -> None:
    """Run Prefect's API app on ``port`` until the parent stops or dies (the server child)."""
    _die_with_parent(parent_pid)
    import uvicorn

    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host="127.0.0.1",
        port=port,
        log_level="error",
        lifespan="on",
    )


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
