"""SQL over the results: every table is a DuckDB view of the same name, backed by its Parquet files."""

from __future__ import annotations

import duckdb

from xai_audit.storage.parquet import ResultsStore, unreadable_files_named
from xai_audit.storage.schemas import ALL_TABLES


def connect(store: ResultsStore) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per table.

    Summary tables are included; empty tables keep their columns.
    """
    connection = duckdb.connect()
    for table in ALL_TABLES:
        connection.register(table, store.dataset(table))
    return connection


def run_query(store: ResultsStore, sql: str):
    """Run ``sql`` against the results and return the answer as a pandas DataFrame.

    A query that meets an unreadable file fails with a :class:`~xai_audit.storage.parquet.StorageError` naming it.
    """
    with unreadable_files_named(store, (duckdb.Error,)):
        return connect(store).execute(sql).fetch_df()
