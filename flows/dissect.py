"""Dissect subflow: label the units of one model's layers with CLIP-Dissect and Network Dissection."""
from __future__ import annotations

from prefect import flow, get_run_logger

from flows.config import AuditConfig
from storage.parquet import ResultsStore
from tasks.dissect import clip_dissect_task, layers_task, netdissect_task, neurons_unit


@flow(name="dissect-model", flow_run_name="dissect {model_name}")
def dissect_model(config: AuditConfig, model_name: str, results: str, run_id: str) -> int:
    """Label every configured layer of ``model_name``; returns how many work units ran now.

    CLIP-Dissect fans out per layer (the pooled activations of all layers come from one cached
    pass); Network Dissection runs all missing layers in one task, because its passes over the
    probe set are shared by every layer.
    """
    store = ResultsStore(results)
    layers = layers_task(config, model_name)
    missing = {
        method: [layer for layer in layers if not store.has_unit("neurons", run_id, neurons_unit(model_name, layer, method))]
        for method in config.dissect.methods
    }
    get_run_logger().info("%s: layers %s, missing units %s", model_name, layers, missing)
    futures = [clip_dissect_task.submit(config, model_name, layers, layer, results, run_id) for layer in missing.get("clip_dissect", [])]
    if missing.get("netdissect"):
        futures.append(netdissect_task.submit(config, model_name, missing["netdissect"], results, run_id))
    for future in futures:
        future.result()
    return len(futures)
