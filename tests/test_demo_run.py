"""`xai-audit run` with no config, from an empty folder: the shipped demo audit, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from xai_audit.tasks.core.config import load_config

pytestmark = pytest.mark.slow


def test_run_without_a_config_runs_the_shipped_demo_audit_from_an_empty_folder(tmp_path):
    """The same audit as configs/demo.yaml (name and config hash), results and report in the current folder."""
    import os
    import subprocess
    import sys

    from xai_audit.storage.parquet import ResultsStore
    from xai_audit.storage.runs import RunRecord

    repo_copy = load_config(Path(__file__).parents[1] / "configs" / "demo.yaml")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env["HOME"] = str(tmp_path / "home")  # the demo model and toy CLIP come from $XAI_AUDIT_CACHE
    done = subprocess.run(
        [str(Path(sys.executable).with_name("xai-audit")), "run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    store = ResultsStore(str(tmp_path / "results"))
    (run_id,) = store.run_ids()
    record = RunRecord.load(store, run_id)
    assert (record.status, record.config_name, record.config_hash) == ("completed", "demo", repo_copy.config_hash())
    assert store.read("predictions", run_id)["image_id"].nunique() == repo_copy.images.limit
    assert set(store.read("neurons", run_id)["method"]) == set(repo_copy.dissect.methods)
    assert set(store.read("saliency", run_id)["method"]) == set(repo_copy.explain.methods)
    report = Path(done.stdout.strip().splitlines()[-1].removeprefix("report: "))
    assert report.is_file() and report.is_relative_to(tmp_path / "results")
