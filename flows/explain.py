"""Explain subflow: one model's per-image explanations, fanned out over image chunks."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.futures import as_completed

from xai_audit.storage.parquet import ResultsStore
from xai_audit.tasks.core.config import AuditConfig
from xai_audit.tasks.core.progress import step, track
from xai_audit.tasks.explain.sanity import SANITY_TABLES, sanity_unit
from xai_audit.tasks.explain.stage import EXPLAIN_TABLES, chunk_unit
from xai_audit.tasks.explain.tasks import explain_chunk, sanity_model


def chunk_done(store: ResultsStore, run_id: str, model: str, index: int) -> bool:
    """A chunk is done when every table it writes has its file (files appear atomically)."""
    unit = chunk_unit(model, index)
    return all(store.has_unit(table, run_id, unit) for table in EXPLAIN_TABLES)


@flow(name="explain-model", flow_run_name="explain {model_name}")
def explain_model(config: AuditConfig, model_name: str, n_chunks: int, results: str, run_id: str) -> int:
    """Explain the run's ``images`` chunks ``0 .. n_chunks-1`` with one model; returns how many chunks ran now."""
    store = ResultsStore(results)
    todo = [index for index in range(n_chunks) if not chunk_done(store, run_id, model_name, index)]
    get_run_logger().info("%s: %d chunk(s), %d already done", model_name, n_chunks, n_chunks - len(todo))
    step(
        "explain %s: %d chunk(s) of %d image(s) with %s; %d already done",
        model_name,
        n_chunks,
        config.explain.chunk_size,
        ", ".join(config.explain.methods),
        n_chunks - len(todo),
    )
    futures = [explain_chunk.submit(config, model_name, index, results, run_id) for index in todo]
    for future in track(as_completed(futures), f"explain {model_name}", total=len(futures), unit="chunks"):
        future.result()
    sanity = config.explain.sanity
    if sanity.enabled and not all(store.has_unit(t, run_id, sanity_unit(model_name)) for t in SANITY_TABLES):
        step("sanity checks %s: %s on %d image(s)", model_name, ", ".join(sanity.tests), sanity.images)
        sanity_model.submit(config, model_name, n_chunks, results, run_id).result()
    return len(futures)
