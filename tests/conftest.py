"""Test-wide settings: an isolated cache reused across local runs, quiet offline Prefect."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Trained demo artefacts are cached here so one test session trains them once; CI's fresh
# clone starts empty and trains them inside the suite.
os.environ.setdefault("XAI_AUDIT_CACHE", str(REPO / ".cache" / "test-cache"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from xai_audit.flows.prefect_api import own_prefect_home  # noqa: E402

# Never ~/.prefect: another Prefect version there can migrate its database under the suite.
os.environ.setdefault("PREFECT_HOME", str(own_prefect_home()))
Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API (SQLite) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
