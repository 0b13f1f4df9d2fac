"""The dissect stage's Prefect tasks: probe listing, layer resolution, one labelling work unit."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.tasks import exponential_backoff

from xai_audit.storage.parquet import ResultsStore
from xai_audit.tasks.core.config import AuditConfig
from xai_audit.tasks.core.errors import ConfigError
from xai_audit.tasks.data.loaded_models import using_model
from xai_audit.tasks.dissect.labellers import labeller
from xai_audit.tasks.dissect.probe import open_probe
from xai_audit.tasks.dissect.stage import (
    final_layer_check_rows,
    label_checks_unit,
    labelling_errors_unit,
    model_layers,
    write_neurons,
)


@task(name="dissect-layers", task_run_name="resolve layers of {model_name}")
def layers_task(config: AuditConfig, model_name: str) -> list[str]:
    """The layers of ``model_name`` to label (checked against the model)."""
    model_config = config.model(model_name)
    with using_model(config, model_config) as model:
        return model_layers(model, model_config.layers)


@task(
    name="label-units",
    task_run_name="{method} {model_name} {layers}",
    tags=["gpu"],
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
)
def label_task(
    config: AuditConfig,
    model_name: str,
    method: str,
    all_layers: list[str],
    layers: list[str],
    results: str,
    run_id: str,
) -> int:
    """Label ``layers`` of ``model_name`` with ``method``; one ``neurons`` file per layer, returns the row count.

    The ``errors`` file is written first: a layer's ``neurons`` file marks its unit done.
    """
    probe = open_probe(config)
    with using_model(config, config.model(model_name)) as model:
        labels = labeller(method).label(config, model, all_layers, layers, probe)
    store = ResultsStore(results)
    store.write("errors", run_id, labelling_errors_unit(model_name, method, layers), labels.errors)
    rows = sum(write_neurons(store, run_id, model_name, layer, method, frame) for layer, frame in labels.frames.items())
    get_run_logger().info("%s %s: %d units over %d layer(s)", method, model_name, rows, len(labels.frames))
    return rows


@task(name="label-checks", task_run_name="final-layer self-test {model_name}", tags=["gpu"])
def label_check_task(config: AuditConfig, model_name: str, results: str, run_id: str) -> int:
    """The final-layer self-test of ``model_name``: one ``label_checks`` file; returns the row count.

    A model without an output layer to test (no last ``nn.Linear`` with one output per class) is
    not a failed item: the test does not apply, and the log says why.
    """
    probe = open_probe(config)
    model_config = config.model(model_name)
    try:
        with using_model(config, model_config) as model:
            rows = final_layer_check_rows(config, model, probe, model_layers(model, model_config.layers))
    except ConfigError as exc:
        get_run_logger().warning("%s: no final-layer self-test: %s", model_name, exc.message)
        return 0
    ResultsStore(results).write("label_checks", run_id, label_checks_unit(model_name), rows.assign(model=model_name))
    classes = rows[rows["concept_set"] == "classes"]
    get_run_logger().info(
        "%s final-layer self-test: accuracy %.3f, text similarity %.3f over %d output units",
        model_name,
        classes["correct"].mean(),
        classes["text_similarity"].mean(),
        len(classes),
    )
    return len(rows)


@task(name="probe-set", task_run_name="probe set")
def probe_task(config: AuditConfig, results: str, run_id: str) -> int:
    """List and check the probe set once; its unusable images become ``errors`` rows."""
    probe = open_probe(config)
    ResultsStore(results).write("errors", run_id, "probe", probe.errors)
    return len(probe.image_ids)
