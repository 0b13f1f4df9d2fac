"""Fixtures of the bad-input matrix."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.robustness.audit_files import tiny_audit, write_config, write_images


@pytest.fixture
def audit_files(tmp_path) -> tuple[Path, Path]:
    """(config file, results root) of a tiny audit over four images."""
    write_images(tmp_path / "images")
    return write_config(tmp_path, tiny_audit("images")), tmp_path / "results"
