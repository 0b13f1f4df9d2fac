"""Explain one chunk of images with one model: predictions and saliency maps, as table rows.

:func:`explain_records` is the pure part (images in, rows out); :func:`explain_chunk` is the
Prefect task that adds orchestration (tags, retries, a name) and writes the chunk's files.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from prefect import task
from prefect.tasks import exponential_backoff

from flows.config import AuditConfig, ModelConfig
from storage.maps import encode_map
from storage.parquet import ResultsStore, safe_name
from tasks.errors import ItemError
from tasks.images import load_rgb

# Tables every explain chunk writes (an empty file when it has no rows), in write order: the
# chunk counts as done once the last one exists.
EXPLAIN_TABLES = ("predictions", "saliency", "errors")


def chunk_unit(model: str, index: int) -> str:
    """The deterministic work-unit name of a model's ``index``-th image chunk."""
    return f"{safe_name(model)}-chunk{index:05d}"


@dataclass
class ChunkRows:
    """The rows one chunk contributes to each table."""

    predictions: list[dict] = field(default_factory=list)
    saliency: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)


def _error_row(model: str, item_id: str, error: Exception) -> dict:
    error_type = error.error_type if isinstance(error, ItemError) else type(error).__name__
    message = error.message if isinstance(error, ItemError) else str(error)
    return {"stage": "explain", "item_id": item_id, "error_type": error_type, "message": message, "model": model}


def _true_label(record: dict, class_names: list[str]) -> int | None:
    if record.get("label") is not None:
        return int(record["label"])
    return class_names.index(record["label_name"]) if record.get("label_name") in class_names else None


def load_pixels(model, records: list[dict], target_mode: str) -> tuple[list[dict], list[torch.Tensor], list[dict]]:
    """Decode and preprocess each record; a broken image (or a missing label when maps must explain
    the label) becomes an error row, not an exception."""
    usable, pixels, errors = [], [], []
    for record in records:
        try:
            if target_mode == "label" and _true_label(record, model.class_names) is None:
                raise ItemError(record["image_id"], "explain.target is 'label' but the image has no label among the model's classes")
            pixels.append(model.preprocess(load_rgb(record["path"], item_id=record["image_id"])))
            usable.append(record)
        except ItemError as error:
            errors.append(_error_row(model.name, record["image_id"], error))
    return usable, pixels, errors


def explain_records(config: AuditConfig, model_config: ModelConfig, model, records: list[dict]) -> ChunkRows:
    """Predictions and CAMs of ``records`` with ``model`` (a :class:`tasks.models.LoadedModel`)."""
    from tasks.cams import forward_with_cams
    from tasks.models import default_cam_layer, resolve_layer

    rows = ChunkRows()
    usable, pixels, rows.errors = load_pixels(model, records, config.explain.target)
    layer = resolve_layer(model.module, model_config.cam_layer or default_cam_layer(model.module, model.input_size))
    device = next(model.module.parameters()).device
    explain = config.explain
    for start in range(0, len(usable), explain.batch_size):
        batch_records = usable[start:start + explain.batch_size]
        batch = torch.stack(pixels[start:start + explain.batch_size]).to(device)
        true_labels = [_true_label(record, model.class_names) for record in batch_records]
        logits, maps = forward_with_cams(model.module, layer, batch, true_labels if explain.target == "label" else None, explain.methods)
        probabilities = torch.softmax(logits.float(), dim=-1)
        top_prob, top_label = probabilities.topk(min(explain.topk, probabilities.shape[1]), dim=-1)
        for row_index, record in enumerate(batch_records):
            labels, probs = top_label[row_index].tolist(), top_prob[row_index].tolist()
            true_label = true_labels[row_index]
            rows.predictions.append({
                "model": model.name, "image_id": record["image_id"], "label": labels[0],
                "label_name": model.class_names[labels[0]], "prob": probs[0], "true_label": true_label,
                "topk": [{"label": label, "name": model.class_names[label], "prob": prob} for label, prob in zip(labels, probs)],
            })
            target = true_label if explain.target == "label" else labels[0]
            for method, method_maps in maps.items():
                rows.saliency.append({"model": model.name, "image_id": record["image_id"], "method": method,
                                      "target": target, **encode_map(method_maps[row_index])})
    return rows


@task(name="explain-chunk", task_run_name="explain {model_name} chunk {chunk_index}", tags=["gpu"],
      retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2))
def explain_chunk(config: AuditConfig, model_name: str, chunk_index: int, records: list[dict], results: str, run_id: str) -> dict[str, int]:
    """Explain one chunk and write its files; returns the row count per table."""
    from tasks.runtime import using_model

    model_config = next(model for model in config.models if model.name == model_name)
    with using_model(config, model_config) as model:
        rows = explain_records(config, model_config, model, records)
    store = ResultsStore(results)
    unit = chunk_unit(model_name, chunk_index)
    for table in EXPLAIN_TABLES:
        store.write(table, run_id, unit, getattr(rows, table))
    return {table: len(getattr(rows, table)) for table in EXPLAIN_TABLES}
