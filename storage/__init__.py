"""Parquet schemas, atomic writes, the runs manifest and SQL over the results."""
