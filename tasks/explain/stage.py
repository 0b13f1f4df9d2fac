"""Explain one chunk of images with one model: predictions, saliency maps and their metrics.

:func:`explain_records` is the pure part (records in, table rows out); the Prefect task in
:mod:`xai_audit.tasks.explain.tasks` adds orchestration and writes the chunk's files. The stage asks the
explainer registry for maps and the metric registry for scores, so it never branches on a
method's or a metric's name. Metrics are computed from the maps exactly as stored (float16), so
recomputing them from the ``saliency`` table gives the stored values.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from xai_audit.storage.maps import decode_map, encode_map
from xai_audit.storage.parquet import safe_name
from xai_audit.tasks.compute.oom import is_out_of_memory, run_with_backoff
from xai_audit.tasks.compute.precision import amp_dtype as precision_dtype
from xai_audit.tasks.compute.precision import autocast_context
from xai_audit.tasks.core.config import AuditConfig, ModelConfig
from xai_audit.tasks.core.errors import ConfigError, ItemError
from xai_audit.tasks.core.rows import error_row
from xai_audit.tasks.data.images import load_rgb
from xai_audit.tasks.data.layer_layout import LayerLayout, layer_layout
from xai_audit.tasks.data.models import default_cam_layer, resolve_layer
from xai_audit.tasks.explain.base import ExplainContext, Explainer, Explanations
from xai_audit.tasks.explain.concepts import AttributionBatch, LayerLabels, attribution_rows
from xai_audit.tasks.explain.registry import families
from xai_audit.tasks.explain.targets import image_targets
from xai_audit.tasks.metrics.base import ScoredBatch
from xai_audit.tasks.metrics.maps import require_finite
from xai_audit.tasks.metrics.registry import METRICS

# Tables every explain chunk writes (an empty file when it has no rows); ``errors`` last, so a
# chunk counts as done once its errors file exists.
EXPLAIN_TABLES = (
    "predictions",
    "saliency",
    "agreement",
    "localization",
    "faithfulness",
    "lime_trials",
    "lime_uncertainty",
    "scores",
    "unit_contributions",
    "concept_attribution",
    "errors",
)


def chunk_unit(model: str, index: int) -> str:
    """The deterministic work-unit name of a model's ``index``-th image chunk."""
    return f"{safe_name(model)}-chunk{index:05d}"


@dataclass
class ChunkRows:
    """The rows one chunk contributes to each of :data:`EXPLAIN_TABLES`."""

    tables: dict[str, list[dict]] = field(default_factory=lambda: {table: [] for table in EXPLAIN_TABLES})

    def add(self, table: str, rows: list[dict]) -> None:
        if table not in self.tables:
            raise ValueError(f"explain chunks write {', '.join(EXPLAIN_TABLES)}, not {table!r}")
        self.tables[table].extend(rows)


@dataclass
class _Input:
    record: dict
    pixels: torch.Tensor
    gt_mask: np.ndarray | None
    true_label: int | None


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
            raise ItemError(
                record["image_id"],
                f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {image_size[0]}x{image_size[1]}",
            )
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
                raise ItemError(
                    record["image_id"], "explain.target is 'label' but the image has no label among the model's classes"
                )
            image = load_rgb(record["path"], item_id=record["image_id"])
            mask = ground_truth_mask(model, record, image.size) if with_masks else None
            inputs.append(_Input(record, model.preprocess(image), mask, true_label))
        except (ItemError, OSError) as error:
            errors.append(error_row("explain", model.name, error, record["image_id"]))
    return inputs, errors


def predict(module: torch.nn.Module, batch: torch.Tensor, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """The batch's logits (float32), the forward that picks each image's predicted class."""
    with torch.no_grad(), autocast_context(batch.device, amp_dtype):
        return module(batch).float()


def explain_family(
    family: Explainer, context: ExplainContext, batch: torch.Tensor, targets: list[int], methods: list[str]
) -> Iterator[tuple[Explanations, dict[str, Exception]]]:
    """The family's explanations of the batch, and the methods that raised with their errors.

    One method's failure (a shape error, an unsupported layer) is not its siblings' nor the run's:
    when the family's shared call raises, each method runs alone and only the ones that raise
    again are left out. Running out of memory is not a method's failure: it propagates to the
    batch-size back-off.
    """
    try:
        explained = family.explain(context, batch, targets, methods)
    except Exception as error:  # noqa: BLE001 - any method's exception becomes its errors row
        if is_out_of_memory(error):
            raise
        if len(methods) == 1:
            yield Explanations({}), {methods[0]: error}
            return
    else:
        yield explained, {}
        return
    for method in methods:
        yield from explain_family(family, context, batch, targets, [method])


def method_error_row(model: str, method: str, image_ids: list[str], error: Exception) -> dict:
    """The ``errors`` row of a method that raised on a batch (item: the method's name)."""
    first = f"{image_ids[0]} and {len(image_ids) - 1} more" if len(image_ids) > 1 else image_ids[0]
    described = ItemError(method, f"{method} failed on {first}: {type(error).__name__}: {error}", type(error).__name__)
    return error_row("explain", model, described)


ConceptLayers = Mapping[str, tuple[torch.nn.Module, LayerLabels]]
"""Layer name -> (module, the labels the dissect stage gave its units): where targets are attributed to concepts."""


def explain_batch(
    config: AuditConfig,
    model,
    layer: torch.nn.Module,
    inputs: list[_Input],
    concept_layers: ConceptLayers | None = None,
    layer_name: str | None = None,
    layout: LayerLayout | None = None,
) -> ChunkRows:
    """Every configured explanation and metric of one batch of decoded images, for each of their
    targets (``explain.target``), and the concept attributions of those targets at ``concept_layers``;
    ``layout``: how ``layer`` (called ``layer_name``) becomes maps (None: NCHW)."""
    explain = config.explain
    device = next(model.module.parameters()).device
    amp_dtype = precision_dtype(explain.precision, device)
    batch = torch.stack([item.pixels for item in inputs]).to(device)
    model.module.eval()
    probabilities = torch.softmax(predict(model.module, batch, amp_dtype), dim=-1)
    image_ids = [item.record["image_id"] for item in inputs]
    passes = image_targets(
        explain.target, probabilities, [item.true_label for item in inputs], model.class_names, model.name
    )
    context = ExplainContext(model, layer, explain, config.seed, amp_dtype, image_ids, layout)
    rows = ChunkRows()
    finite = torch.isfinite(probabilities).all(dim=-1).cpu().numpy()
    for index in np.flatnonzero(~finite):
        error = ItemError(image_ids[index], "the model's output is not finite (NaN/Inf)", "NonFiniteOutputError")
        rows.add("errors", [error_row("explain", model.name, error, image_ids[index])])
    usable = finite.copy()
    for targets in passes:
        pass_rows = ChunkRows()
        usable &= explain_targets(
            config, context, batch, probabilities, inputs, targets, finite, pass_rows, concept_layers
        )
        for table, table_rows in pass_rows.tables.items():
            rows.add(table, _keyed_by_target(table, table_rows, image_ids, targets, model, len(passes) > 1))
    top_prob, top_label = probabilities.topk(min(explain.topk, probabilities.shape[1]), dim=-1)
    for index in np.flatnonzero(usable):
        labels, probs = top_label[index].tolist(), top_prob[index].tolist()
        rows.add(
            "predictions",
            [
                {
                    "model": model.name,
                    "image_id": image_ids[index],
                    "label": labels[0],
                    "label_name": model.class_names[labels[0]],
                    "prob": probs[0],
                    "true_label": inputs[index].true_label,
                    "cam_layer": layer_name,
                    "cam_layout": (layout or LayerLayout("nchw")).describe(),
                    "topk": [
                        {"label": label, "name": model.class_names[label], "prob": prob}
                        for label, prob in zip(labels, probs)
                    ],
                }
            ],
        )
    return rows


def _keyed_by_target(
    table: str, table_rows: list[dict], image_ids: list[str], targets: list[int], model, several: bool
) -> list[dict]:
    """One pass's rows with the target each belongs to: every row about an image gets its ``target``
    column; with several targets per image an ``errors`` message also names the class it explained."""
    target_of = dict(zip(image_ids, targets))
    if table == "errors":
        if not several:
            return table_rows
        return [
            {**row, "message": f"{row['message']} (explaining {model.class_names[target_of[row['item_id']]]})"}
            if row["item_id"] in target_of
            else row
            for row in table_rows
        ]
    return [
        {**row, "target": target_of[row["image_id"]]} if "image_id" in row and "target" not in row else row
        for row in table_rows
    ]


def explain_targets(
    config: AuditConfig,
    context: ExplainContext,
    batch: torch.Tensor,
    probabilities: torch.Tensor,
    inputs: list[_Input],
    targets: list[int],
    finite: np.ndarray,
    rows: ChunkRows,
    concept_layers: ConceptLayers | None = None,
) -> np.ndarray:
    """One pass over the batch explaining ``targets`` (one class per image): its maps, metrics and
    concept attributions into ``rows``; returns which images it explained (bool ``[B]``: at least one
    finite map). A method whose map of an image is not finite, or whose family failed on it, loses
    that image alone: its siblings' maps and metrics of the image are kept."""
    explain, model, image_ids = config.explain, context.model, list(context.image_ids)
    maps: dict[str, np.ndarray] = {}
    failed: dict[int, list[tuple[ItemError, frozenset[str]]]] = {}
    road_methods: set[str] = set()
    for family, methods in families(explain.methods):
        for explained, method_errors in explain_family(family, context, batch, targets, methods):
            maps.update(explained.maps)
            for index, error in explained.failed.items():
                failed.setdefault(index, []).append((error, frozenset(explained.maps)))
            road_methods.update(explained.maps if family.road else ())
            for table, table_rows in explained.rows.items():
                rows.add(table, table_rows)
            for method, error in method_errors.items():
                rows.add("errors", [method_error_row(model.name, method, image_ids, error)])
    stored = {
        method: np.stack([decode_map(encode_map(m)) for m in maps[method]])
        for method in explain.methods
        if method in maps
    }
    mapped = {method: np.zeros(len(image_ids), dtype=bool) for method in stored}
    for index in np.flatnonzero(finite):
        left_out: set[str] = set()
        for error, family_methods in failed.get(index, ()):
            rows.add("errors", [error_row("explain", model.name, error, image_ids[index])])
            left_out |= family_methods
        for method in stored.keys() - left_out:
            try:
                require_finite(stored[method][index], image_ids[index])
            except ItemError as error:
                named = ItemError(error.item_id, f"{method}: {error.message}", error.error_type)
                rows.add("errors", [error_row("explain", model.name, named, image_ids[index])])
            else:
                mapped[method][index] = True
        rows.add(
            "saliency",
            [
                {
                    "model": model.name,
                    "image_id": image_ids[index],
                    "method": method,
                    "target": targets[index],
                    **encode_map(stored[method][index]),
                }
                for method in stored
                if mapped[method][index]
            ],
        )
    usable = finite & np.logical_or.reduce(list(mapped.values())) if mapped else finite.copy()
    scored = ScoredBatch(
        model.name,
        model.module,
        batch,
        stored,
        targets,
        image_ids,
        [item.gt_mask for item in inputs],
        usable,
        explain.metrics,
        config.seed,
        context.amp_dtype,
        frozenset(road_methods),
        mapped,
    )
    for metric in METRICS.values():
        if metric.enabled(explain.metrics):
            for table, table_rows in metric.rows(scored).items():
                rows.add(table, table_rows)
    if explain.concepts.enabled and concept_layers and usable.any():
        target_probabilities = probabilities[torch.arange(len(targets)), torch.as_tensor(targets)].cpu().numpy()
        batch_keys = AttributionBatch(model.name, image_ids, targets, target_probabilities, usable)
        try:
            attributed = attribution_rows(
                model.module,
                concept_layers,
                batch,
                batch_keys,
                explain.concepts.top_k,
                explain.concepts.ablation,
                config.seed,
                context.amp_dtype,
            )
        except ValueError as error:
            logging.getLogger(__name__).warning("no concept attributions for %s: %s", model.name, error)
        else:
            for table, table_rows in attributed.items():
                rows.add(table, table_rows)
    return usable


def cam_layer_name(model_config: ModelConfig, model) -> str:
    """The configured CAM layer, or the default one of the model's architecture."""
    return model_config.cam_layer or default_cam_layer(model.module, model.input_size)


def explain_records(
    config: AuditConfig,
    model_config: ModelConfig,
    model,
    records: list[dict],
    logger: logging.Logger | None = None,
    labels: Mapping[str, LayerLabels] | None = None,
) -> ChunkRows:
    """Explanations and metrics of ``records`` with ``model`` (a :class:`xai_audit.tasks.data.models.LoadedModel`);
    ``labels``: the unit labels of the model's dissected layers (layer -> labels), for concept
    attributions at those of them that ``explain.concepts.layers`` names (all by default)."""
    layer_name = cam_layer_name(model_config, model)
    layer = resolve_layer(model.module, layer_name, field="models.cam_layer")
    try:
        layout = layer_layout(model.module, layer, model.input_size)
    except ValueError as error:
        raise ConfigError("models.cam_layer", f"{layer_name}: {error}; name a layer with a map or token grid") from None
    wanted = config.explain.concepts.layers
    concept_layers = {
        name: (resolve_layer(model.module, name, field="explain.concepts.layers"), layer_labels)
        for name, layer_labels in (labels or {}).items()
        if layer_labels and (wanted is None or name in wanted)
    }
    inputs, errors = load_inputs(model, records, config.explain.target, config.explain.metrics.localization)
    rows = ChunkRows()
    rows.add("errors", errors)
    batches = run_with_backoff(
        lambda batch: explain_batch(config, model, layer, batch, concept_layers, layer_name, layout),
        inputs,
        config.explain.batch_size,
        logger or logging.getLogger(__name__),
    )
    for batch_rows in batches:
        for table, table_rows in batch_rows.tables.items():
            rows.add(table, table_rows)
    return rows
