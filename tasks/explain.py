"""Explain one chunk of images with one model: predictions, saliency maps and their metrics.

:func:`explain_records` is the pure part (records in, table rows out); :func:`explain_chunk` is
the Prefect task that adds orchestration (tags, retries, a name) and writes the chunk's files.
Metrics are computed from the maps exactly as stored (float16), so recomputing them from the
``saliency`` table gives the stored values.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw
from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError
from prefect.tasks import exponential_backoff

from flows.config import AuditConfig, ModelConfig
from storage.maps import decode_map, encode_map
from storage.parquet import ResultsStore, safe_name
from tasks.errors import ItemError, NonFiniteError
from tasks.images import load_rgb
from tasks.oom import run_with_backoff

# Tables every explain chunk writes (an empty file when it has no rows); ``errors`` last, so a
# chunk counts as done once its errors file exists.
EXPLAIN_TABLES = ("predictions", "saliency", "agreement", "localization", "faithfulness", "lime_trials", "errors")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def chunk_unit(model: str, index: int) -> str:
    """The deterministic work-unit name of a model's ``index``-th image chunk."""
    return f"{safe_name(model)}-chunk{index:05d}"


@dataclass
class ChunkRows:
    """The rows one chunk contributes to each table."""

    predictions: list[dict] = field(default_factory=list)
    saliency: list[dict] = field(default_factory=list)
    agreement: list[dict] = field(default_factory=list)
    localization: list[dict] = field(default_factory=list)
    faithfulness: list[dict] = field(default_factory=list)
    lime_trials: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)


@dataclass
class _Input:
    record: dict
    pixels: torch.Tensor
    gt_mask: np.ndarray | None
    true_label: int | None


def _error_row(model: str, item_id: str, error: Exception) -> dict:
    error_type = error.error_type if isinstance(error, ItemError) else type(error).__name__
    message = error.message if isinstance(error, ItemError) else str(error)
    return {"stage": "explain", "item_id": item_id, "error_type": error_type, "message": message, "model": model}


def _true_label(record: dict, class_names: list[str]) -> int | None:
    if record.get("label") is not None:
        return int(record["label"])
    return class_names.index(record["label_name"]) if record.get("label_name") in class_names else None


def ground_truth_mask(model, record: dict, image_size: tuple[int, int]) -> np.ndarray | None:
    """The record's object mask (a mask file or a box) in model-input geometry, or None.

    The mask goes through the model's own preprocessing as a white-on-black image, so resize
    and crop match the image's exactly; it is then thresholded at half intensity.
    """
    if record.get("mask_path"):
        with Image.open(record["mask_path"]) as mask_file:
            mask = np.asarray(mask_file.convert("RGB")).any(axis=-1)
        if mask.shape != (image_size[1], image_size[0]):
            raise ItemError(record["image_id"], f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {image_size[0]}x{image_size[1]}")
        drawn = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).convert("RGB")
    elif record.get("box"):
        drawn = Image.new("RGB", image_size)
        ImageDraw.Draw(drawn).rectangle(tuple(record["box"]), fill=(255, 255, 255))
    else:
        return None
    channel = model.preprocess(drawn)[0] * model.std[0] + model.mean[0]
    return (channel > 0.5).numpy()


def load_inputs(model, records: list[dict], target_mode: str, with_masks: bool) -> tuple[list[_Input], list[dict]]:
    """Decode and preprocess each record; a broken image or mask, or a missing label when maps must
    explain the label, becomes an error row instead of an exception."""
    inputs, errors = [], []
    for record in records:
        try:
            true_label = _true_label(record, model.class_names)
            if target_mode == "label" and true_label is None:
                raise ItemError(record["image_id"], "explain.target is 'label' but the image has no label among the model's classes")
            image = load_rgb(record["path"], item_id=record["image_id"])
            mask = ground_truth_mask(model, record, image.size) if with_masks else None
            inputs.append(_Input(record, model.preprocess(image), mask, true_label))
        except (ItemError, OSError) as error:
            errors.append(_error_row(model.name, record["image_id"], error))
    return inputs, errors


def _batch_size(setting: int | str) -> int | None:
    """A configured batch size, None for ``auto`` (the method then picks one by device and precision)."""
    return None if setting == "auto" else int(setting)


def _lime_maps(config: AuditConfig, model, batch: torch.Tensor, targets: list[int], image_ids: list[str],
               amp_dtype) -> tuple[np.ndarray, list[dict], dict[int, ItemError]]:
    """LIME maps of a batch (scaled to max |weight| = 1, a ranking-preserving scale), search trials,
    and the images LIME failed on (their maps are NaN), by batch index."""
    from tasks.lime_explain import SegmentationCache, explain_lime, lime_search

    settings = config.explain.lime
    model_fn = model.pixel_model
    mean, std = model_fn.mean.cpu(), model_fn.std.cpu()
    images = [((pixels.cpu() * std[0] + mean[0]).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for pixels in batch]
    hide_color = None if settings.hide_color is None else tuple(settings.hide_color)
    cache = SegmentationCache(max_entries=max(1, len(images)))
    batch_size = _batch_size(settings.batch_size)
    maps = np.full((len(images), *images[0].shape[:2]), np.nan, dtype=np.float32)
    trials, failed = [], {}
    # one image per call (explain_lime loops over images anyway), so a model that fails on one image fails only that image
    for index, (image, target, image_id) in enumerate(zip(images, targets, image_ids)):
        try:
            (result,) = explain_lime(model_fn, [image], [target], segmentation=settings.segmentation,
                                     segmentation_params=settings.segmentation_params, num_samples=settings.num_samples,
                                     hide_color=hide_color, kernel_width=settings.kernel_width, num_features=settings.num_features,
                                     seed=config.seed, batch_size=batch_size, amp_dtype=amp_dtype, cache=cache)
            search = None if not settings.search.enabled else lime_search(
                model_fn, image, target, settings.search.grid, seeds=tuple(settings.search.seeds), hide_color=hide_color,
                num_features=settings.num_features, steps=config.explain.metrics.steps, batch_size=batch_size,
                amp_dtype=amp_dtype, cache=cache)
        except NonFiniteError as error:
            failed[index] = ItemError(image_id, error.message, error.error_type)
            continue
        maps[index] = result.saliency_map
        if search is not None:
            trials += [{"model": model.name, "image_id": image_id, "params_json": json.dumps(trial.params, sort_keys=True),
                        "objective": trial.objective, "seconds": trial.seconds, "components_json": json.dumps(trial.components, sort_keys=True),
                        "best": trial is search.best} for trial in search.trials]
    scale = np.abs(maps).reshape(len(maps), -1).max(axis=1).reshape(-1, 1, 1)
    maps = np.divide(maps, scale, out=np.full_like(maps, np.nan), where=scale > 0)
    maps[(scale == 0).ravel()] = 0.0
    return maps, trials, failed


def explain_batch(config: AuditConfig, model, layer: torch.nn.Module, inputs: list[_Input]) -> ChunkRows:
    """Every configured explanation and metric of one batch of decoded images."""
    from tasks.cams import forward_with_cams
    from tasks.metrics import agreement_rows, deletion_insertion, localization_row, require_finite, scaled_tolerance
    from tasks.road import road_scores

    explain, metrics = config.explain, config.explain.metrics
    amp_dtype = PRECISIONS[explain.precision]
    device = next(model.module.parameters()).device
    batch = torch.stack([item.pixels for item in inputs]).to(device)
    label_targets = [item.true_label for item in inputs] if explain.target == "label" else None
    cam_methods = [method for method in explain.methods if method != "lime"]
    logits, maps = forward_with_cams(model.module, layer, batch, label_targets, cam_methods, amp_dtype=amp_dtype,
                                     scorecam_batch_size=_batch_size(explain.scorecam_batch_size), ablationcam_batch_size=explain.ablationcam_batch_size)
    probabilities = torch.softmax(logits.float(), dim=-1)
    targets = label_targets or probabilities.argmax(dim=-1).tolist()
    image_ids = [item.record["image_id"] for item in inputs]
    rows = ChunkRows()
    failed: dict[int, ItemError] = {}
    if "lime" in explain.methods:
        maps["lime"], rows.lime_trials, failed = _lime_maps(config, model, batch, targets, image_ids, amp_dtype)
    top_prob, top_label = probabilities.topk(min(explain.topk, probabilities.shape[1]), dim=-1)
    stored = {method: np.stack([decode_map(encode_map(m)) for m in method_maps]) for method, method_maps in maps.items()}
    usable = np.ones(len(inputs), dtype=bool)
    for index, item in enumerate(inputs):
        base = {"model": model.name, "image_id": image_ids[index]}
        try:
            if not torch.isfinite(logits[index]).all():
                raise ItemError(image_ids[index], "the model's output is not finite (NaN/Inf)", "NonFiniteOutputError")
            if index in failed:
                raise failed[index]
            for method in stored:
                require_finite(stored[method][index], f"{image_ids[index]} ({method})")
        except ItemError as error:
            usable[index] = False
            rows.errors.append(_error_row(model.name, image_ids[index], error))
            continue
        labels, probs = top_label[index].tolist(), top_prob[index].tolist()
        rows.predictions.append({**base, "label": labels[0], "label_name": model.class_names[labels[0]], "prob": probs[0],
                                 "true_label": item.true_label,
                                 "topk": [{"label": l, "name": model.class_names[l], "prob": p} for l, p in zip(labels, probs)]})
        image_maps = {method: stored[method][index] for method in stored}
        for method, saliency_map in image_maps.items():
            rows.saliency.append({**base, "method": method, "target": targets[index], **encode_map(saliency_map)})
        rows.agreement += [{**base, **row} for row in agreement_rows(image_maps, metrics.agreement_rule, metrics.agreement_q)]
        if metrics.localization and item.gt_mask is not None and item.gt_mask.any():
            tolerance = scaled_tolerance(max(item.gt_mask.shape))
            rows.localization += [{**base, "method": method, **localization_row(saliency_map, item.gt_mask, tolerance, metrics.agreement_rule, metrics.agreement_q)}
                                  for method, saliency_map in image_maps.items()]
    if metrics.faithfulness and usable.any():
        keep = np.flatnonzero(usable)
        for method, method_maps in stored.items():
            deletion, insertion = deletion_insertion(model.module, batch[keep], method_maps[keep], [targets[i] for i in keep],
                                                     steps=metrics.steps, baseline=metrics.baseline, batch_size=_batch_size(metrics.batch_size), amp_dtype=amp_dtype)
            road = (road_scores(model.module, batch[keep], method_maps[keep], [targets[i] for i in keep], metrics.road_percentiles, config.seed)
                    if metrics.road and method != "lime" else np.full(len(keep), np.nan))
            for i, d, n, r in zip(keep, deletion, insertion, road):
                if np.isfinite(d) and np.isfinite(n):
                    rows.faithfulness.append({"model": model.name, "image_id": image_ids[i], "method": method, "deletion_auc": float(d),
                                              "insertion_auc": float(n), "road": float(r) if np.isfinite(r) else None})
                else:  # the model failed on some deleted/inserted image: no AUC rather than a NaN one
                    rows.errors.append(_error_row(model.name, image_ids[i], NonFiniteError(
                        image_ids[i], f"{method} faithfulness: the model's output on deleted/inserted images is not finite (NaN/Inf)",
                        "NonFiniteMetricError")))
    return rows


def explain_records(config: AuditConfig, model_config: ModelConfig, model, records: list[dict]) -> ChunkRows:
    """Explanations and metrics of ``records`` with ``model`` (a :class:`tasks.models.LoadedModel`)."""
    from tasks.models import default_cam_layer, resolve_layer

    layer = resolve_layer(model.module, model_config.cam_layer or default_cam_layer(model.module, model.input_size), field="models.cam_layer")
    inputs, errors = load_inputs(model, records, config.explain.target, config.explain.metrics.localization)
    rows = ChunkRows(errors=errors)
    batches = run_with_backoff(lambda batch: explain_batch(config, model, layer, batch), inputs, config.explain.batch_size, _logger())
    for batch_rows in batches:
        for table in EXPLAIN_TABLES:
            getattr(rows, table).extend(getattr(batch_rows, table))
    return rows


def _logger():
    """The task run's logger inside Prefect, this module's logger outside."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


@task(name="explain-chunk", task_run_name="explain {model_name} chunk {chunk_index}", tags=["gpu"],
      retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2))
def explain_chunk(config: AuditConfig, model_name: str, chunk_index: int, results: str, run_id: str) -> dict[str, int]:
    """Explain one chunk of the run's ``images`` table and write its files; returns the row count per table."""
    from tasks.image_sets import read_image_chunk
    from tasks.runtime import using_model

    store = ResultsStore(results)
    records = read_image_chunk(store, run_id, chunk_index)
    model_config = next(model for model in config.models if model.name == model_name)
    with using_model(config, model_config) as model:
        rows = explain_records(config, model_config, model, records)
    unit = chunk_unit(model_name, chunk_index)
    for table in EXPLAIN_TABLES:
        store.write(table, run_id, unit, getattr(rows, table))
    return {table: len(getattr(rows, table)) for table in EXPLAIN_TABLES}
