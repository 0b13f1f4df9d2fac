"""One Arrow schema per results table (the **contract** of DESIGN.md); writers validate against them."""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

_TOP = pa.list_(pa.struct([("concept", pa.string()), ("score", pa.float32())]))
_TOPK = pa.list_(pa.struct([("label", pa.int32()), ("name", pa.string()), ("prob", pa.float32())]))


def _schema(doc: str, *fields: tuple[str, pa.DataType, str]) -> pa.Schema:
    """A schema whose metadata carries the table's description and each column's meaning."""
    return pa.schema(
        [pa.field(name, dtype, metadata={"description": text}) for name, dtype, text in fields],
        metadata={"description": doc, "xai_audit_schema_version": str(SCHEMA_VERSION)},
    )


_RUN = ("run_id", pa.string(), "Run identifier (also the Hive partition key).")
_MODEL = ("model", pa.string(), "Model name from the config.")
_IMAGE = ("image_id", pa.string(), "Image path relative to its set's root, POSIX style.")
_METHOD = ("method", pa.string(), "Explanation method (gradcam, scorecam, lime, ...).")

TABLES: dict[str, pa.Schema] = {
    "runs": _schema(
        "One row per run: its config, status and timings.",
        _RUN,
        ("config_name", pa.string(), "The config's name (runs of one name are resumed and compared)."),
        ("status", pa.string(), "running, completed, partial (some items failed) or failed."),
        ("config_json", pa.string(), "The validated config as canonical JSON."),
        ("config_hash", pa.string(), "Hash of config_json."),
        ("started_at", pa.timestamp("us", tz="UTC"), "Start time."),
        ("finished_at", pa.timestamp("us", tz="UTC"), "End time (null while running)."),
        ("versions", pa.string(), "JSON of package versions (torch, torchvision, grad-cam, lime, open_clip, prefect, xai-audit)."),
        ("device", pa.string(), "Torch device the run used."),
        ("hostname", pa.string(), "Machine that ran it."),
        ("timings_json", pa.string(), "JSON of seconds per stage."),
        ("n_errors", pa.int64(), "Rows in the errors table for this run."),
        ("message", pa.string(), "Why the run failed, when it did."),
    ),
    "predictions": _schema(
        "One row per (model, image): the model's top-k classes.",
        _RUN, _MODEL, _IMAGE,
        ("label", pa.int32(), "Top-1 class index."),
        ("label_name", pa.string(), "Top-1 class name."),
        ("prob", pa.float32(), "Top-1 softmax probability."),
        ("topk", _TOPK, "Top-k classes with names and probabilities."),
        ("true_label", pa.int32(), "Ground-truth class index when the image set has labels."),
    ),
    "neurons": _schema(
        "One row per (model, layer, unit, method): the unit's concept.",
        _RUN, _MODEL,
        ("layer", pa.string(), "Layer name (named_modules)."),
        ("unit", pa.int32(), "Channel index in the layer."),
        ("method", pa.string(), "clip_dissect or netdissect."),
        ("concept", pa.string(), "Best concept."),
        ("category", pa.string(), "Concept category (color, object, texture, scene, ...)."),
        ("score", pa.float32(), "Similarity (clip_dissect) or IoU (netdissect) of the best concept."),
        ("top_concepts", _TOP, "Best concepts with scores, best first."),
        ("top_images", pa.list_(pa.string()), "Most activating probe images."),
        ("interpretable", pa.bool_(), "netdissect: best IoU reaches the configured iou_threshold."),
        ("threshold", pa.float32(), "netdissect: the unit's activation threshold (top-quantile level)."),
        ("best_per_category", pa.list_(pa.struct([("category", pa.string()), ("concept", pa.string()), ("score", pa.float32())])),
         "netdissect: best concept and IoU in each category."),
    ),
    "saliency": _schema(
        "One row per (model, image, method): the map, enough to recompute every metric.",
        _RUN, _MODEL, _IMAGE, _METHOD,
        ("target", pa.int32(), "Class the map explains."),
        ("height", pa.int32(), "Map height (the model input's)."),
        ("width", pa.int32(), "Map width."),
        ("map", pa.binary(), "Row-major float16 map, height*width values in [0, 1]."),
    ),
    "agreement": _schema(
        "One row per (model, image, method pair): how much two methods agree.",
        _RUN, _MODEL, _IMAGE,
        ("method_a", pa.string(), "First method (alphabetical)."),
        ("method_b", pa.string(), "Second method."),
        ("iou", pa.float32(), "IoU of the binarised maps."),
        ("spearman", pa.float32(), "Spearman rank correlation over pixels."),
        ("com_distance", pa.float32(), "Centre-of-mass distance / image diagonal."),
        ("rule", pa.string(), "Binarisation rule: top_q or otsu."),
        ("q", pa.float32(), "Share of pixels kept by the top_q rule (null for otsu)."),
    ),
    "localization": _schema(
        "One row per (model, image, method) with ground truth: does the map point at the object?",
        _RUN, _MODEL, _IMAGE, _METHOD,
        ("pointing_hit", pa.bool_(), "The map's maximum lies within tolerance of the mask."),
        ("iou_gt", pa.float32(), "IoU of the binarised map with the mask."),
        ("energy_in_gt", pa.float32(), "Share of the map's mass inside the mask."),
    ),
    "faithfulness": _schema(
        "One row per (model, image, method): deletion and insertion AUC.",
        _RUN, _MODEL, _IMAGE, _METHOD,
        ("deletion_auc", pa.float32(), "Area under the target probability as top pixels are removed (lower is better)."),
        ("insertion_auc", pa.float32(), "Area under the target probability as top pixels are revealed (higher is better)."),
    ),
    "lime_trials": _schema(
        "One row per (image, LIME parameter set) of the LIME search.",
        _RUN, _MODEL, _IMAGE,
        ("params_json", pa.string(), "The trial's parameters as JSON."),
        ("objective", pa.float32(), "The search objective: deletion AUC + (1 - stability) / 2 (lower is better)."),
        ("seconds", pa.float32(), "Wall time of the trial."),
        ("components_json", pa.string(), "The objective's parts as JSON: deletion_auc, insertion_auc, stability, top_k_jaccard, n_segments."),
        ("best", pa.bool_(), "This trial has the image's lowest objective."),
    ),
    "errors": _schema(
        "One row per failed item: what failed, where and why.",
        _RUN,
        ("stage", pa.string(), "Stage that failed (explain, dissect, ...)."),
        ("item_id", pa.string(), "Item that failed (image id, model name, ...)."),
        ("error_type", pa.string(), "Exception type."),
        ("message", pa.string(), "What was wrong."),
        ("model", pa.string(), "Model, when the failure belongs to one."),
    ),
}


def schema_of(table: str) -> pa.Schema:
    """The schema of ``table``; an unknown name lists the valid ones."""
    try:
        return TABLES[table]
    except KeyError:
        raise KeyError(f"unknown table {table!r}; tables: {sorted(TABLES)}") from None


def describe_tables() -> str:
    """Markdown reference of every table and column, generated from the schemas."""
    lines = [f"Schema version {SCHEMA_VERSION}.", ""]
    for name, schema in TABLES.items():
        lines += [f"#### `{name}`", "", schema.metadata[b"description"].decode(), "", "| column | type | meaning |", "|---|---|---|"]
        lines += [f"| `{f.name}` | `{f.type}` | {f.metadata[b'description'].decode()} |" for f in schema]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
