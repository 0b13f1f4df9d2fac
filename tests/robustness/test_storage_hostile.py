"""The storage cases of the bad-input matrix: unwritable root, disk full mid-write, corrupt files."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from tests.robustness.audit_files import N_IMAGES, tiny_audit, write_config, write_images
from xai_audit.flows.cli import main
from xai_audit.storage import parquet
from xai_audit.storage.integrity import CORRUPT_PREFIX
from xai_audit.storage.parquet import ResultsStore, find_bad_files
from xai_audit.storage.runs import RunRecord


def every_file(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


def visible_parquet(root: Path) -> list[Path]:
    return [
        path
        for path in every_file(root)
        if path.suffix == ".parquet" and not any(part.startswith((".", "_")) for part in path.relative_to(root).parts)
    ]


def only_run(store: ResultsStore) -> str:
    (run_id,) = store.run_ids()
    return run_id


# --------------------------------------------------------------------------- results root not writable


def must_not_load():
    raise AssertionError("the model was loaded although the results root cannot be written")


@pytest.mark.parametrize("blocker", ["a file in the way", "permission denied"])
def test_unwritable_results_root_exits_2_before_any_work(tmp_path, monkeypatch, capsys, blocker):
    write_images(tmp_path / "images")
    data = tiny_audit("images")
    data["models"][0]["callable"] = "tests.robustness.test_storage_hostile:must_not_load"
    config = write_config(tmp_path, data)
    if blocker == "a file in the way":
        (tmp_path / "taken").write_text("a regular file where the results folder should go")
        results = tmp_path / "taken" / "results"
    else:  # tests run as root, where chmod cannot take write access away: refuse like a read-only mount
        results = tmp_path / "results"
        results.mkdir()
        real_open = LocalFileSystem.open

        def read_only(self, path, mode="rb", *args, **kwargs):
            if "w" in mode and str(path).startswith(str(results)):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(self, path, mode, *args, **kwargs)

        monkeypatch.setattr(LocalFileSystem, "open", read_only)
    assert main(["run", str(config), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert "results:" in err and "not writable" in err and str(results) in err
    assert not results.exists() or every_file(results) == []


# --------------------------------------------------------------------------- disk full while writing


def test_disk_full_mid_write_leaves_no_partial_file_and_a_resume_completes(
    prefect_harness, audit_files, monkeypatch, capsys
):
    config, results = audit_files
    real_write = parquet.pq.write_table

    def disk_full_on_the_second_saliency_chunk(table, where, *args, **kwargs):
        name = getattr(where, "name", str(where))
        if "saliency" in name and "chunk00001" in name:
            where.write(b"PAR1" + b"\0" * 200)  # some bytes reach the disk before it fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(table, where, *args, **kwargs)

    monkeypatch.setattr(parquet.pq, "write_table", disk_full_on_the_second_saliency_chunk)
    assert main(["run", str(config), "--results", str(results)]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "saliency" in err
    store = ResultsStore(results)
    run_id = only_run(store)
    assert RunRecord.load(store, run_id).status == "failed"
    assert [path.name for path in every_file(results) if path.name.startswith(".")] == []  # no temp file left behind
    assert find_bad_files(store) == []  # every visible file reads
    assert len(store.read("saliency", run_id)) == 2  # the first chunk only; nothing of the failed one
    monkeypatch.setattr(parquet.pq, "write_table", real_write)

    assert main(["run", str(config), "--results", str(results)]) == 0  # resumes the failed run by itself
    assert only_run(store) == run_id and RunRecord.load(store, run_id).status == "completed"
    saliency = store.read("saliency", run_id)
    assert sorted(saliency["image_id"]) == [f"img{index}.png" for index in range(N_IMAGES)]


# --------------------------------------------------------------------------- corrupt files


def test_corrupt_file_is_reported_by_runs_check_refused_by_reads_and_recomputed_on_resume(
    prefect_harness, audit_files, capsys
):
    config, results = audit_files
    assert main(["run", str(config), "--results", str(results)]) == 0
    store = ResultsStore(results)
    run_id = only_run(store)
    before = store.read("saliency", run_id).sort_values("image_id").reset_index(drop=True)
    assert main(["runs", "--check", "--results", str(results)]) == 0
    assert "every file" in capsys.readouterr().out

    victim = Path(store.files("saliency", run_id)[1])
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a copy cut short
    wrong_types = Path(store._dir("predictions", run_id)) / "stray.parquet"
    pq.write_table(
        pa.table({"image_id": [1, 2], "prob": ["high", "low"]}), wrong_types
    )  # reads, but not as predictions

    assert main(["runs", "--check", "--results", str(results), "--format", "json"]) == 1
    captured = capsys.readouterr()
    reported = {row["path"]: row for row in json.loads(captured.out)}
    assert set(reported) == {str(victim), str(wrong_types)}
    assert reported[str(victim)]["run_id"] == run_id and reported[str(victim)]["table"] == "saliency"
    assert reported[str(wrong_types)]["table"] == "predictions"
    assert "--resume" in captured.err

    # reads never use the file silently: they fail naming it
    assert main(["query", "--results", str(results), "select count(*) as n from saliency"]) == 1
    assert str(victim) in capsys.readouterr().err
    assert main(["summarize", "--results", str(results), run_id]) == 1
    err = capsys.readouterr().err
    assert str(victim) in err and "runs --check" in err

    os.remove(wrong_types)
    assert main(["run", str(config), "--results", str(results), "--resume", run_id]) == 0
    assert main(["runs", "--check", "--results", str(results)]) == 0
    after = store.read("saliency", run_id).sort_values("image_id").reset_index(drop=True)
    assert after[["image_id", "method", "target"]].equals(before[["image_id", "method", "target"]])
    assert (after["map"] == before["map"]).all()  # the unit was recomputed, not dropped
    assert (victim.parent / f"{CORRUPT_PREFIX}{victim.name}").is_file()  # kept aside for inspection
    assert victim in visible_parquet(results)
