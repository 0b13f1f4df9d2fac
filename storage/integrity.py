"""Integrity of a results root: which Parquet files cannot be read, and setting them aside.

Atomic writes keep partial files out of sight, but a file can still rot afterwards (a disk
error, a copy cut short, a hand edit). Such a file is never read silently: ``xai-audit runs
--check`` lists it, a read that meets it fails naming it, and resuming its run moves it aside
under a hidden ``.corrupt-`` name (readers skip hidden names, so its work unit counts as missing
and is recomputed; the bytes stay for inspection).
"""

from __future__ import annotations

import logging
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as ds

from xai_audit.storage.parquet import ResultsStore, StorageError, file_schema
from xai_audit.storage.schemas import ALL_TABLES

log = logging.getLogger(__name__)

CORRUPT_PREFIX = ".corrupt-"


@dataclass(frozen=True)
class BadFile:
    """One visible Parquet file that cannot be read with its table's schema."""

    table: str
    run_id: str | None
    path: str
    problem: str


def _run_of(path: str) -> str | None:
    parts = [part for part in path.split("/") if part.startswith("run_id=")]
    return parts[-1].removeprefix("run_id=") if parts else None


def file_problem(store: ResultsStore, table: str, path: str) -> str | None:
    """Why ``path`` cannot be read as a file of ``table`` (None when every row reads).

    The file is read completely, through the same schema the store reads it with, so a bad
    footer, a damaged page or a column of the wrong type are all found.
    """
    try:
        ds.dataset([path], schema=file_schema(table), format="parquet", filesystem=store.fs).to_table()
    except Exception as error:  # noqa: BLE001 - any failure to read is exactly what we report
        return f"{type(error).__name__}: {error}"
    return None


def find_bad_files(store: ResultsStore, run_id: str | None = None) -> list[BadFile]:
    """Every unreadable visible file of every table (optionally of one run), in table order."""
    bad = []
    for table in ALL_TABLES:
        for path in store.files(table, run_id):
            problem = file_problem(store, table, path)
            if problem is not None:
                bad.append(BadFile(table, _run_of(path), path, problem))
    return bad


def set_aside(store: ResultsStore, bad: BadFile) -> str:
    """Move an unreadable file to a hidden name beside it (invisible to readers); returns the new path."""
    folder, name = posixpath.split(bad.path)
    target = posixpath.join(folder, f"{CORRUPT_PREFIX}{name}")
    try:
        store.fs.mv(bad.path, target)
    except OSError as error:
        raise StorageError(f"cannot move the unreadable file {bad.path} aside: {error}") from error
    return target


def repair_run(store: ResultsStore, run_id: str) -> list[BadFile]:
    """Set aside every unreadable file of ``run_id`` (each logged as a warning).

    Resuming the run then recomputes those units.
    """
    bad = find_bad_files(store, run_id)
    for item in bad:
        target = set_aside(store, item)
        log.warning(
            "unreadable %s file %s moved to %s (recomputed now): %s", item.table, item.path, target, item.problem
        )
    return bad


def require_writable(store: ResultsStore) -> None:
    """Raise :class:`StorageError` unless a file can be created under the results root (checked before a run starts)."""
    probe = f"{store.base}/.write-probe-{uuid.uuid4().hex}"
    try:
        if store.local:  # object stores have no folders (and creating a bucket is not ours to do)
            store.fs.makedirs(store.base, exist_ok=True)
        with store.fs.open(probe, "wb") as handle:
            handle.write(b"ok")
        store.fs.rm(probe)
    except OSError as error:
        raise StorageError(f"results root {store.root} is not writable: {error}") from error


@contextmanager
def unreadable_files_named(
    store: ResultsStore, errors: tuple[type[BaseException], ...] = (pa.ArrowInvalid, OSError)
) -> Iterator[None]:
    """Turn a read failure caused by unreadable files into a :class:`StorageError` naming them.

    Only the failure path scans the root, so reads cost nothing extra; a failure with no bad
    file behind it is re-raised unchanged.
    """
    try:
        yield
    except errors as error:
        bad = find_bad_files(store)
        if not bad:
            raise
        listing = "; ".join(f"{item.path} ({item.problem})" for item in bad)
        raise StorageError(
            f"{len(bad)} unreadable file(s) under {store.root}: {listing}. "
            "`xai-audit runs --check` lists them; resuming their run recomputes them"
        ) from error


__all__ = [
    "BadFile",
    "CORRUPT_PREFIX",
    "file_problem",
    "find_bad_files",
    "set_aside",
    "repair_run",
    "unreadable_files_named",
    "require_writable",
]
