"""The explain stage's Prefect task: one image chunk of one model, its files written atomically."""

from __future__ import annotations

import logging

import pyarrow.dataset as ds
from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError
from prefect.tasks import exponential_backoff

from xai_audit.storage.parquet import ResultsStore
from xai_audit.tasks.core.config import AuditConfig
from xai_audit.tasks.data.image_sets import read_image_chunk
from xai_audit.tasks.data.loaded_models import using_model
from xai_audit.tasks.explain.concepts import UNIT_LABEL_COLUMNS, LayerLabels, layer_labels
from xai_audit.tasks.explain.sanity import SANITY_TABLES, sanity_rows, sanity_unit
from xai_audit.tasks.explain.stage import EXPLAIN_TABLES, chunk_unit, explain_records


def _logger() -> logging.Logger:
    """The task run's logger inside Prefect, this module's logger outside."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def unit_labels(store: ResultsStore, run_id: str, model_name: str) -> dict[str, LayerLabels]:
    """The run's counted unit labels of the model, per dissected layer (empty when none was dissected)."""
    where = ds.field("model") == model_name
    neurons = store.dataset("neurons", run_id).to_table(columns=UNIT_LABEL_COLUMNS, filter=where).to_pandas()
    return {layer: layer_labels(neurons, layer) for layer in sorted(set(neurons["layer"]))}


@task(
    name="explain-chunk",
    task_run_name="explain {model_name} chunk {chunk_index}",
    tags=["gpu"],
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
)
def explain_chunk(config: AuditConfig, model_name: str, chunk_index: int, results: str, run_id: str) -> dict[str, int]:
    """Explain one chunk of the run's ``images`` table and write its files; returns the row count per table."""
    store = ResultsStore(results)
    records = read_image_chunk(store, run_id, chunk_index)
    model_config = config.model(model_name)
    with using_model(config, model_config) as model:
        labels = unit_labels(store, run_id, model_name) if config.explain.concepts.enabled else {}
        rows = explain_records(config, model_config, model, records, _logger(), labels)
    unit = chunk_unit(model_name, chunk_index)
    for table in EXPLAIN_TABLES:
        store.write(table, run_id, unit, rows.tables[table])
    return {table: len(rows.tables[table]) for table in EXPLAIN_TABLES}


def first_images(store: ResultsStore, run_id: str, n_chunks: int, count: int) -> list[dict]:
    """The first ``count`` records of the run's ``images`` table, in chunk order."""
    records: list[dict] = []
    for chunk in range(n_chunks):
        if len(records) >= count:
            break
        records += read_image_chunk(store, run_id, chunk)
    return records[:count]


@task(
    name="sanity-model",
    task_run_name="sanity checks {model_name}",
    tags=["gpu"],
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
)
def sanity_model(config: AuditConfig, model_name: str, n_chunks: int, results: str, run_id: str) -> dict[str, int]:
    """Run the sanity checks of one model on the first ``explain.sanity.images`` images and write its
    ``sanity`` and ``errors`` files; returns the row count per table."""
    store = ResultsStore(results)
    records = first_images(store, run_id, n_chunks, config.explain.sanity.images)
    model_config = config.model(model_name)
    with using_model(config, model_config) as model:
        rows = sanity_rows(config, model_config, model, records)
    unit = sanity_unit(model_name)
    for table in SANITY_TABLES:
        store.write(table, run_id, unit, rows[table])
    return {table: len(rows[table]) for table in SANITY_TABLES}
