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

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API (SQLite) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
