"""Explain subflow: one model's per-image explanations, fanned out over image chunks."""
from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from tqdm import tqdm

from flows.config import AuditConfig
from storage.parquet import ResultsStore
from tasks.explain import EXPLAIN_TABLES, chunk_unit, explain_chunk


def plan_chunks(records: list[dict], chunk_size: int) -> list[list[dict]]:
    """Consecutive chunks of ``chunk_size`` image records (the last one may be shorter)."""
    return [records[start:start + chunk_size] for start in range(0, len(records), chunk_size)]


def chunk_done(store: ResultsStore, run_id: str, model: str, index: int) -> bool:
    """A chunk is done when every table it writes has its file (files appear atomically)."""
    unit = chunk_unit(model, index)
    return all(store.has_unit(table, run_id, unit) for table in EXPLAIN_TABLES)


@flow(name="explain-model", flow_run_name="explain {model_name}")
def explain_model(config: AuditConfig, model_name: str, records: list[dict], results: str, run_id: str, show_progress: bool = False) -> int:
    """Explain every image of ``records`` with one model; returns how many chunks ran now."""
    store = ResultsStore(results)
    chunks = plan_chunks(records, config.explain.chunk_size)
    todo = [index for index in range(len(chunks)) if not chunk_done(store, run_id, model_name, index)]
    get_run_logger().info("%s: %d chunk(s), %d already done", model_name, len(chunks), len(chunks) - len(todo))
    futures = [
        explain_chunk.submit(config, model_name, index, chunks[index], results, run_id)
        for index in todo
    ]
    with tqdm(total=len(futures), desc=f"explain {model_name}", unit="chunk", disable=not show_progress) as bar:
        for future in as_completed(futures):
            future.result()
            bar.update()
    return len(futures)
