"""Atomic, idempotent Parquet writes and schema-checked reads under a results root.

Layout: ``ROOT/<table>/run_id=<run_id>/<unit>.parquet`` (Hive style: ``run_id`` lives in the path,
not in the file, so pandas, pyarrow and DuckDB all read it as a column). Each work unit owns one file with a
deterministic name, so re-running the unit replaces it and never duplicates rows. On a local
filesystem a file is written under a hidden temp name and renamed into place; on an object store
a single PUT is already all-or-nothing, so the final key is written directly. Readers skip names
starting with ``.`` or ``_`` and therefore never see a partial file.

An ``s3://bucket/prefix`` root goes through s3fs, which takes its endpoint and credentials from
the standard AWS settings (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, or ``~/.aws``), so MinIO, Ceph or a local S3 server need no config field.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from xai_audit.storage.schemas import ALL_TABLES, SCHEMA_VERSION, schema_of
from xai_audit.tasks.core.errors import XaiAuditError

_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")


def file_schema(table: str) -> pa.Schema:
    """The columns stored inside a table's files: all but the ``run_id`` partition key."""
    schema = schema_of(table)
    return schema.remove(schema.get_field_index("run_id"))


class StorageError(XaiAuditError):
    """The results root cannot be written or holds something unreadable."""


def safe_name(text: str) -> str:
    """A file-name-safe rendering of ``text`` (model names, unit names) that stays readable."""
    cleaned = _UNSAFE.sub("_", text).strip("._")
    return cleaned or "_"


class ResultsStore:
    """The Parquet tables under one results root (a local folder or an fsspec URL)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = str(root)
        self.fs, self.base = fsspec.core.url_to_fs(self.root)
        self.local = isinstance(self.fs, LocalFileSystem)

    def _dir(self, table: str, run_id: str) -> str:
        return f"{self.base}/{table}/run_id={safe_name(run_id)}"

    def unit_path(self, table: str, run_id: str, unit: str) -> str:
        """Where the file of one work unit lives."""
        schema_of(table)
        return f"{self._dir(table, run_id)}/{safe_name(unit)}.parquet"

    def has_unit(self, table: str, run_id: str, unit: str) -> bool:
        self._forget_listings()
        return self.fs.exists(self.unit_path(table, run_id, unit))

    def _forget_listings(self) -> None:
        """Drop cached listings: other processes (Dask workers, concurrent runs, a resumed run) write here too.

        fsspec shares one filesystem instance per process, and object-store filesystems cache
        listings in it, file sizes and ETags included; answers from that cache would miss new
        files and fail to open rewritten ones (s3fs checks the ETag), so every listing asks the store.
        """
        if not self.local:
            self.fs.invalidate_cache()

    def write(self, table: str, run_id: str, unit: str, rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> str:
        """Validate ``rows`` against the table's schema and write them as the unit's file, atomically."""
        schema = schema_of(table)
        records = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else [dict(row) for row in rows]
        unknown = sorted({key for row in records for key in row} - set(schema.names))
        if unknown:
            raise StorageError(f"table {table!r} has no column(s) {unknown}; columns: {schema.names}")
        if any(row.get("run_id", run_id) != run_id for row in records):
            raise StorageError(f"rows for table {table!r} name another run than {run_id!r}")
        try:
            arrow_table = pa.Table.from_pylist(records, schema=file_schema(table))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as error:
            raise StorageError(f"rows for table {table!r} do not match its schema: {error}") from error
        path = self.unit_path(table, run_id, unit)
        try:
            if self.local:
                self.fs.makedirs(self._dir(table, run_id), exist_ok=True)
                self._write_local(arrow_table, path)
            else:
                with self.fs.open(path, "wb") as handle:
                    pq.write_table(arrow_table, handle)
        except OSError as error:
            raise StorageError(f"cannot write {table} unit {unit!r} under {self.root}: {error}") from error
        return path

    @staticmethod
    def _write_local(arrow_table: pa.Table, path: str) -> None:
        folder, name = os.path.split(path)
        temp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{name}")
        try:
            with open(temp, "wb") as handle:
                pq.write_table(arrow_table, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
        finally:
            if os.path.exists(temp):
                os.remove(temp)

    def files(self, table: str, run_id: str | None = None) -> list[str]:
        """The visible Parquet files of a table (optionally of one run), sorted."""
        schema_of(table)
        folder = self._dir(table, run_id) if run_id else f"{self.base}/{table}"
        self._forget_listings()
        if not self.fs.exists(folder):
            return []
        found = self.fs.find(folder)
        return sorted(
            path
            for path in found
            if path.endswith(".parquet")
            and not any(part.startswith((".", "_")) for part in path[len(folder) :].split("/"))
        )

    def dataset(self, table: str, run_id: str | None = None) -> ds.Dataset:
        """A lazy pyarrow dataset of the table with its declared schema (missing columns read as null)."""
        schema = schema_of(table)
        files = self.files(table, run_id)
        if not files:
            return ds.dataset(schema.empty_table())
        partitioning = ds.partitioning(pa.schema([schema.field("run_id")]), flavor="hive")
        return ds.dataset(
            files,
            schema=schema,
            format="parquet",
            filesystem=self.fs,
            partitioning=partitioning,
            partition_base_dir=f"{self.base}/{table}",
        )

    def read_unit(self, table: str, run_id: str, unit: str) -> list[dict[str, Any]]:
        """One work unit's rows as plain Python values (``run_id`` lives in the path, not the file)."""
        with unreadable_files_named(self):
            return pq.read_table(
                self.unit_path(table, run_id, unit), schema=file_schema(table), filesystem=self.fs
            ).to_pylist()

    def read(self, table: str, run_id: str | None = None) -> pd.DataFrame:
        """The table (or one run of it) as a DataFrame; an unreadable file fails naming it (see
        :func:`unreadable_files_named`)."""
        with unreadable_files_named(self):
            return self.dataset(table, run_id).to_table().to_pandas()

    def run_ids(self) -> list[str]:
        """Every run id that has a manifest."""
        return sorted(self.read("runs")["run_id"].tolist())


def file_schema_version(store: ResultsStore, path: str) -> int:
    """The schema version a file was written with (0 when it predates versioning)."""
    with store.fs.open(path, "rb") as handle:
        metadata = pq.read_schema(handle).metadata or {}
    return int(metadata.get(b"xai_audit_schema_version", b"0"))


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
    "ResultsStore",
    "StorageError",
    "SCHEMA_VERSION",
    "file_problem",
    "file_schema_version",
    "find_bad_files",
    "safe_name",
    "unreadable_files_named",
]
