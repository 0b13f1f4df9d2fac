"""Integrity of a results root: setting unreadable Parquet files aside, and checking it can be written.

Atomic writes keep partial files out of sight, but a file can still rot afterwards (a disk
error, a copy cut short, a hand edit). Such a file is never read silently: ``xai-audit runs
--check`` lists it and a read that meets it fails naming it (both on the reading side,
:mod:`xai_audit.storage.parquet`); resuming its run moves it aside under a hidden ``.corrupt-``
name (readers skip hidden names, so its work unit counts as missing and is recomputed; the bytes
stay for inspection).
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import uuid

from xai_audit.storage.parquet import BadFile, ResultsStore, StorageError, find_bad_files

log = logging.getLogger(__name__)

CORRUPT_PREFIX = ".corrupt-"


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
    """Raise :class:`StorageError` unless a file can be created under the results root (checked before a run
    starts). Folders it creates for the check are removed again: a config refused afterwards leaves nothing."""
    probe = f"{store.base}/.write-probe-{uuid.uuid4().hex}"
    created: list[str] = []
    try:
        if store.local:  # object stores have no folders (and creating a bucket is not ours to do)
            folder = store.base
            while not store.fs.exists(folder) and folder != posixpath.dirname(folder):
                created.append(folder)
                folder = posixpath.dirname(folder)
            store.fs.makedirs(store.base, exist_ok=True)
        with store.fs.open(probe, "wb") as handle:
            handle.write(b"ok")
        store.fs.rm(probe)
    except OSError as error:
        raise StorageError(f"results root {store.root} is not writable: {error}") from error
    finally:
        for folder in created:  # deepest first; each is empty unless something else wrote there meanwhile
            with contextlib.suppress(OSError):
                store.fs.rmdir(folder)


__all__ = ["CORRUPT_PREFIX", "set_aside", "repair_run", "require_writable"]
