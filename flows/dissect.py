"""Dissect subflow: label the units of one model's layers with every configured labelling method."""

from __future__ import annotations

from prefect import flow, get_run_logger

from xai_audit.storage.parquet import ResultsStore
from xai_audit.tasks.core.config import AuditConfig
from xai_audit.tasks.core.progress import step
from xai_audit.tasks.dissect.labellers import labeller
from xai_audit.tasks.dissect.stage import label_checks_unit, neurons_unit
from xai_audit.tasks.dissect.tasks import label_check_task, label_task, layers_task


@flow(name="dissect-model", flow_run_name="dissect {model_name}")
def dissect_model(config: AuditConfig, model_name: str, results: str, run_id: str) -> int:
    """Label every configured layer of ``model_name``; returns how many work units ran now.

    Each labeller says how its work is cut (:class:`xai_audit.tasks.dissect.base.Labeller`): one unit per
    missing layer, or all missing layers of the model in one unit.
    """
    store = ResultsStore(results)
    layers = layers_task(config, model_name)
    missing = {
        method: [
            layer for layer in layers if not store.has_unit("neurons", run_id, neurons_unit(model_name, layer, method))
        ]
        for method in config.dissect.methods
    }
    get_run_logger().info("%s: layers %s, missing units %s", model_name, layers, missing)
    for method, todo in missing.items():
        step("dissect %s with %s: %d of %d layer(s) to label", model_name, method, len(todo), len(layers))
    futures = []
    for method, todo in missing.items():
        units = [[layer] for layer in todo] if labeller(method).fan_out == "layer" else [todo] if todo else []
        futures += [label_task.submit(config, model_name, method, layers, unit, results, run_id) for unit in units]
    if config.dissect.final_layer_check and "clip_dissect" in config.dissect.methods:
        if not store.has_unit("label_checks", run_id, label_checks_unit(model_name)):
            futures.append(label_check_task.submit(config, model_name, results, run_id))
    for future in futures:
        future.result()
    return len(futures)
