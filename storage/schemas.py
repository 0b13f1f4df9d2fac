"""One Arrow schema per results table; writers validate against them.

The schemas are the tables' **contract**: README.md's "Tables" reference is generated from them
(``make docs``, flows/docs.py)."""

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
_TARGET = (
    "target",
    pa.int32(),
    "Class the maps explain (the saliency rows' target; several per image with explain.target topk or class names).",
)

_LABEL_SOURCES = (
    ("probe_set", pa.string(), "The probe set the labels were chosen on (kind or folder, split), e.g. world val."),
    ("probe_images", pa.int32(), "Its usable images."),
    (
        "concept_set",
        pa.string(),
        "Where the candidate labels came from: dissect.concepts' source (clip_dissect) or the probe set's masks.",
    ),
    ("concepts", pa.int32(), "Candidate labels in that set."),
)

TABLES: dict[str, pa.Schema] = {
    "runs": _schema(
        "One row per run: its config, status and timings.",
        _RUN,
        ("config_name", pa.string(), "The config's name (runs of one name are resumed and compared)."),
        ("status", pa.string(), "running, completed, partial (some items failed) or failed."),
        ("config_json", pa.string(), "The validated config as canonical JSON."),
        (
            "config_hash",
            pa.string(),
            "Hash of config_json without its runner section (how tasks execute does not change results).",
        ),
        ("started_at", pa.timestamp("us", tz="UTC"), "Start time."),
        ("finished_at", pa.timestamp("us", tz="UTC"), "End time (null while running)."),
        (
            "versions",
            pa.string(),
            "JSON of package versions (torch, torchvision, grad-cam, lime, open_clip, prefect, xai-audit).",
        ),
        ("device", pa.string(), "Torch device the run used."),
        (
            "precision",
            pa.string(),
            "Autocast precision of the explain stage as resolved on the run's machine, with how it was chosen and "
            "the methods kept in another one, e.g. 'bf16 (auto; ablationcam fp32)'.",
        ),
        (
            "cpu_kernels",
            pa.string(),
            "The CPU's precision path: torch's CPU kernel capability and its bf16 instructions, e.g. "
            "'AVX512; bf16: avx512_bf16' (AMX and AVX512-BF16 round differently, so digits differ between them).",
        ),
        ("hostname", pa.string(), "Machine that ran it."),
        (
            "pid",
            pa.int64(),
            "Process id that ran it on hostname (a running run whose process is gone is resumed automatically).",
        ),
        ("timings_json", pa.string(), "JSON of seconds per stage."),
        ("n_errors", pa.int64(), "Rows in the errors table for this run."),
        ("message", pa.string(), "Why the run failed, when it did."),
    ),
    "images": _schema(
        "One row per usable image of a run's image set, one file per explain chunk (what the explain tasks read).",
        _RUN,
        _IMAGE,
        ("chunk", pa.int32(), "Explain chunk of the image (explain.chunk_size images each, in listing order)."),
        ("path", pa.string(), "Image file."),
        ("label", pa.int32(), "Class index the set gives the image, if any."),
        ("label_name", pa.string(), "Class name the set gives the image, if any."),
        ("mask_path", pa.string(), "Ground-truth object mask, if any."),
        ("box", pa.list_(pa.int32()), "Ground-truth box [x0, y0, x1, y1] in image pixels, if any."),
    ),
    "predictions": _schema(
        "One row per (model, image): the model's top-k classes.",
        _RUN,
        _MODEL,
        _IMAGE,
        ("label", pa.int32(), "Top-1 class index."),
        ("label_name", pa.string(), "Top-1 class name."),
        ("prob", pa.float32(), "Top-1 softmax probability."),
        ("topk", _TOPK, "Top-k classes with names and probabilities."),
        ("true_label", pa.int32(), "Ground-truth class index when the image set has labels."),
        ("cam_layer", pa.string(), "Layer the model's CAMs read (configured or chosen per family)."),
        (
            "cam_layout",
            pa.string(),
            "How that layer's output became maps: nchw; nhwc (channels moved first); tokens (prefix tokens dropped).",
        ),
    ),
    "neurons": _schema(
        "One row per (model, layer, unit, method): the unit's concept.",
        _RUN,
        _MODEL,
        ("layer", pa.string(), "Layer name (named_modules)."),
        ("unit", pa.int32(), "Channel index in the layer."),
        ("method", pa.string(), "clip_dissect or netdissect."),
        ("concept", pa.string(), "Best concept."),
        ("category", pa.string(), "Concept category (color, object, texture, scene, ...)."),
        ("score", pa.float32(), "Similarity (clip_dissect) or IoU (netdissect) of the best concept."),
        ("top_concepts", _TOP, "Best concepts with scores, best first."),
        ("top_images", pa.list_(pa.string()), "Most activating probe images."),
        ("interpretable", pa.bool_(), "netdissect: best IoU reaches the configured iou_threshold."),
        (
            "threshold",
            pa.float32(),
            "netdissect: the unit's activation threshold (top-quantile order statistic; active means strictly above).",
        ),
        (
            "best_per_category",
            pa.list_(pa.struct([("category", pa.string()), ("concept", pa.string()), ("score", pa.float32())])),
            "netdissect: best concept and IoU in each category.",
        ),
        (
            "tied_with",
            pa.list_(pa.string()),
            "Other concepts scoring within dissect.tie_tolerance of the best: the label is a tie, not a decision.",
        ),
        (
            "p_value",
            pa.float64(),
            (
                "Permutation p-value of the label against the unit's responses shuffled across probe images "
                "(dissect.significance; null when off)."
            ),
        ),
        *_LABEL_SOURCES,
    ),
    "label_checks": _schema(
        (
            "One row per (model, check, concept set, unit): a label self-test where the unit's true concept is known "
            "(final_layer: CLIP-Dissect on the classifier's output units, whose concepts are their classes)."
        ),
        _RUN,
        _MODEL,
        ("check", pa.string(), "The self-test (final_layer)."),
        ("layer", pa.string(), "The tested layer (the output layer: the last nn.Linear with one output per class)."),
        (
            "concept_set",
            pa.string(),
            "Concepts CLIP-Dissect chose from: classes (the class names), or the run's set (dissect.concepts.source).",
        ),
        ("similarity", pa.string(), "CLIP-Dissect similarity function."),
        ("unit", pa.int32(), "Output unit (class index)."),
        ("class_name", pa.string(), "The unit's class: its true concept."),
        ("concept", pa.string(), "CLIP-Dissect's label of the unit."),
        ("score", pa.float32(), "The label's similarity score."),
        ("correct", pa.bool_(), "The label is the class name (case-insensitive)."),
        ("text_similarity", pa.float32(), "Cosine of the CLIP text embeddings of label and class name."),
        (
            "tied_with",
            pa.list_(pa.string()),
            "Other concepts scoring within dissect.tie_tolerance of the label: the label is a tie, not a decision.",
        ),
        ("class_in_tie", pa.bool_(), "The class name is the label or one of the concepts tied with it."),
    ),
    "saliency": _schema(
        "One row per (model, image, target, method): the map, enough to recompute every metric.",
        _RUN,
        _MODEL,
        _IMAGE,
        _METHOD,
        ("target", pa.int32(), "Class the map explains."),
        ("height", pa.int32(), "Map height (the model input's)."),
        ("width", pa.int32(), "Map width."),
        ("map", pa.binary(), "Row-major float16 map, height*width values in [0, 1]."),
    ),
    "agreement": _schema(
        "One row per (model, image, target, method pair): how much two methods agree.",
        _RUN,
        _MODEL,
        _IMAGE,
        ("method_a", pa.string(), "First method (alphabetical)."),
        ("method_b", pa.string(), "Second method."),
        ("iou", pa.float32(), "IoU of the binarised maps."),
        ("spearman", pa.float32(), "Spearman rank correlation over pixels."),
        ("com_distance", pa.float32(), "Centre-of-mass distance / image diagonal."),
        ("rule", pa.string(), "Binarisation rule: top_q or otsu."),
        ("q", pa.float32(), "Share of pixels kept by the top_q rule (null for otsu)."),
        _TARGET,
    ),
    "localization": _schema(
        "One row per (model, image, target, method) with ground truth: does the map point at the object?",
        _RUN,
        _MODEL,
        _IMAGE,
        _METHOD,
        (
            "pointing_hit",
            pa.bool_(),
            "A maximal pixel of the map (any, on a plateau) lies within tolerance of the mask.",
        ),
        ("iou_gt", pa.float32(), "IoU of the binarised map with the mask."),
        ("energy_in_gt", pa.float32(), "Share of the map's mass inside the mask."),
        _TARGET,
    ),
    "faithfulness": _schema(
        "One row per (model, image, target, method): deletion and insertion AUC.",
        _RUN,
        _MODEL,
        _IMAGE,
        _METHOD,
        (
            "deletion_auc",
            pa.float32(),
            "Area under the target probability as top pixels are removed (lower is better).",
        ),
        (
            "insertion_auc",
            pa.float32(),
            "Area under the target probability as top pixels are revealed (higher is better).",
        ),
        (
            "road",
            pa.float32(),
            (
                "grad-cam's ROADCombined score, (LeRF - MoRF) / 2 over metrics.road_percentiles (higher is better); "
                "null for LIME or when metrics.road is off."
            ),
        ),
        _TARGET,
    ),
    "lime_trials": _schema(
        "One row per (image, target, LIME parameter set) of the LIME search.",
        _RUN,
        _MODEL,
        _IMAGE,
        ("params_json", pa.string(), "The trial's parameters as JSON."),
        ("objective", pa.float32(), "The search objective: deletion AUC + (1 - stability) / 2 (lower is better)."),
        ("seconds", pa.float32(), "Wall time of the trial."),
        (
            "components_json",
            pa.string(),
            "The objective's parts as JSON: deletion_auc, insertion_auc, stability, top_k_jaccard, n_segments.",
        ),
        ("best", pa.bool_(), "This trial has the image's lowest objective."),
        _TARGET,
    ),
    "lime_uncertainty": _schema(
        "One row per (model, image, target) LIME map: the model evaluations it used and how certain its weights are.",
        _RUN,
        _MODEL,
        _IMAGE,
        ("samples_used", pa.int32(), "Perturbed samples (model evaluations) the map used."),
        ("num_samples", pa.int32(), "explain.lime.num_samples: every sample without adaptive LIME, the cap with it."),
        ("adaptive", pa.bool_(), "explain.lime.adaptive was on."),
        ("rounds", pa.int32(), "Refits of the ridge: 1 without adaptive LIME."),
        ("stopped_early", pa.bool_(), "Adaptive LIME's stopping rule held before the cap."),
        ("weights", pa.list_(pa.float32()), "The ridge weight of each superpixel id (the map before scaling)."),
        (
            "std_errors",
            pa.list_(pa.float32()),
            "Each weight's standard error: lime's weighted ridge as least squares on prior-augmented data (NaN if "
            "the feature selection dropped the superpixel).",
        ),
        ("height", pa.int32(), "Uncertainty map height (the saliency map's)."),
        ("width", pa.int32(), "Uncertainty map width."),
        (
            "map",
            pa.binary(),
            "Row-major float16 per-pixel uncertainty: its superpixel's standard error in the saliency map's units "
            "(divided by the largest absolute weight); 0 where unknown.",
        ),
        _TARGET,
    ),
    "scores": _schema(
        (
            "One row per (image, target, method, value) of a registered metric that has no table of its own "
            "(tasks/metrics/base.py)."
        ),
        _RUN,
        _MODEL,
        _IMAGE,
        _METHOD,
        ("metric", pa.string(), "The value's name, as its metric declares it."),
        ("value", pa.float64(), "The value; its direction (higher or lower is better) is the metric's declaration."),
        _TARGET,
    ),
    "unit_contributions": _schema(
        (
            "One row per (model, image, target, layer): each unit's contribution to the target logit "
            "(gradient x activation summed over the map)."
        ),
        _RUN,
        _MODEL,
        _IMAGE,
        ("target", pa.int32(), "Class whose logit is decomposed (the maps' target)."),
        ("layer", pa.string(), "Layer (the model's CAM layer)."),
        (
            "contributions",
            pa.list_(pa.float32()),
            "Per unit (channel order): sum over the map of activation x d(target logit)/d(activation).",
        ),
        ("logit", pa.float32(), "The target logit (behind a global-pool + linear head it equals sum + bias)."),
    ),
    "concept_attribution": _schema(
        "One row per (model, image, target, labelling method, layer, concept) among the image's top concepts.",
        _RUN,
        _MODEL,
        _IMAGE,
        ("target", pa.int32(), "Class attributed."),
        ("method", pa.string(), "Labelling method whose labels group the units: clip_dissect or netdissect."),
        ("layer", pa.string(), "Layer (the model's CAM layer)."),
        ("concept", pa.string(), "Concept of the units."),
        ("category", pa.string(), "The concept's category."),
        ("rank", pa.int32(), "1 for the concept with the largest contribution (ties: by name)."),
        ("units", pa.int32(), "Units of the layer counted for this concept (netdissect: interpretable ones)."),
        ("contribution", pa.float64(), "Sum of those units' unit_contributions."),
        ("share", pa.float64(), "contribution / the sum of the layer's positive unit contributions."),
        ("heatmap", pa.binary(), "Row-major float32 map on the layer's grid: the units' summed gradient x activation."),
        ("heatmap_height", pa.int32(), "Heatmap rows (the layer's height)."),
        ("heatmap_width", pa.int32(), "Heatmap columns."),
        (
            "ablation_drop",
            pa.float32(),
            "Rank 1 only: target probability minus its value with this concept's units zeroed.",
        ),
        (
            "random_drop",
            pa.float32(),
            "Rank 1 only: the same drop for as many random labelled units of other concepts (seeded per image).",
        ),
        (
            "random_units",
            pa.int32(),
            "Rank 1 only: how many random units were zeroed (fewer when the layer has fewer).",
        ),
    ),
    "sanity": _schema(
        (
            "One row per (model, method, test, step, image) of the sanity checks: the map of a randomised model (or "
            "of another class) and its similarity to the test's step-0 map."
        ),
        _RUN,
        _MODEL,
        _METHOD,
        ("test", pa.string(), "cascading, smprt, emprt or random_logit (README, Sanity checks)."),
        (
            "step",
            pa.int32(),
            (
                "0: the reference map (trained model, explained class); cascading/smprt k: k blocks randomised; "
                "emprt: the number of blocks (all randomised); random_logit 1: a random other class."
            ),
        ),
        ("layer", pa.string(), "The block randomised at this step (emprt: all; null at step 0 and for random_logit)."),
        _IMAGE,
        ("target", pa.int32(), "Class the map explains."),
        (
            "spearman",
            pa.float64(),
            "Spearman rank correlation of the absolute map with the step-0 map (null when a map is constant).",
        ),
        ("ssim", pa.float64(), "SSIM (scikit-image, data range 1) of the max-scaled absolute maps."),
        ("iou", pa.float64(), "IoU of the top explain.metrics.agreement_q pixels of the absolute maps."),
        ("entropy", pa.float64(), "Discrete entropy (nats, explain.sanity.emprt_bins-bin histogram) of the map."),
        ("height", pa.int32(), "Map height."),
        ("width", pa.int32(), "Map width."),
        ("map", pa.binary(), "Row-major float16 map, as in saliency: every similarity recomputes from it."),
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


_LAYER = ("layer", pa.string(), "Layer name (named_modules).")
_NEURON_METHOD = ("method", pa.string(), "Labelling method: clip_dissect or netdissect.")
_UNITS_COUNTED = "Units counted: every labelled unit for clip_dissect, the interpretable ones for netdissect."
_BASELINE = ("baseline_run_id", pa.string(), "The earlier run this run is compared with (run_id holds the later one).")

# Derived tables, recomputed from the tables above by the summary stage (one file per run and
# table, so re-summarizing replaces them). The report and the Prefect artifacts read these.
SUMMARY_TABLES: dict[str, pa.Schema] = {
    "summary_concepts": _schema(
        "One row per (model, layer, method, concept) among the layer's top concepts: the concept histogram.",
        _RUN,
        _MODEL,
        _LAYER,
        _NEURON_METHOD,
        ("rank", pa.int32(), "1 for the concept with most units (ties: alphabetical)."),
        ("concept", pa.string(), "Top-1 concept of the units."),
        ("category", pa.string(), "The concept's category (uncategorized when unknown)."),
        ("units", pa.int64(), _UNITS_COUNTED),
        ("share", pa.float64(), "units / all units of the layer labelled by the method."),
        ("score_mean", pa.float64(), "Mean score (similarity or IoU) of those units."),
    ),
    "summary_categories": _schema(
        "One row per (model, layer, method, category): how the layer's units split over concept categories.",
        _RUN,
        _MODEL,
        _LAYER,
        _NEURON_METHOD,
        ("category", pa.string(), "Concept category (color, object, texture, scene, ...; uncategorized when unknown)."),
        ("units", pa.int64(), _UNITS_COUNTED),
        ("share", pa.float64(), "units / all units of the layer labelled by the method."),
    ),
    "summary_concept_models": _schema(
        "One row per (model, method, concept): whether a concept is unique to one model or shared.",
        _RUN,
        _MODEL,
        _NEURON_METHOD,
        ("concept", pa.string(), "Top-1 concept of at least one counted unit of the model."),
        ("units", pa.int64(), "Counted units of the model (all layers) with this concept."),
        ("n_models", pa.int32(), "Models of the run with at least one such unit."),
        ("scope", pa.string(), "unique (only this model) or shared."),
    ),
    "summary_layers": _schema(
        "One row per (model, layer, method): labelled and interpretable units.",
        _RUN,
        _MODEL,
        _LAYER,
        _NEURON_METHOD,
        ("units", pa.int64(), "Labelled units."),
        ("counted", pa.int64(), _UNITS_COUNTED),
        (
            "interpretable",
            pa.int64(),
            "netdissect: units whose best IoU reaches iou_threshold (null for clip_dissect).",
        ),
        ("interpretable_share", pa.float64(), "netdissect: interpretable / units (null for clip_dissect)."),
        ("tested", pa.int64(), "Units with a p-value (null when dissect.significance is off)."),
        (
            "significant",
            pa.int64(),
            "Units whose label is significant after Benjamini-Hochberg at FDR 0.05 over the layer's tested units.",
        ),
        ("significant_share", pa.float64(), "significant / tested."),
        ("distinct_concepts", pa.int64(), "Different top-1 concepts among the counted units."),
        ("tied", pa.int64(), "Units whose label is a tie (tied_with not empty)."),
        ("score_mean", pa.float64(), "Mean score of the labelled units."),
        ("score_median", pa.float64(), "Median score of the labelled units."),
        *_LABEL_SOURCES,
    ),
    "summary_label_checks": _schema(
        "One row per (model, check, concept set): the label self-tests' results (from label_checks).",
        _RUN,
        _MODEL,
        ("check", pa.string(), "The self-test (final_layer)."),
        ("concept_set", pa.string(), "classes, or the run's concept set."),
        ("layer", pa.string(), "The tested layer."),
        ("similarity", pa.string(), "CLIP-Dissect similarity function."),
        ("units", pa.int64(), "Tested units."),
        ("correct", pa.int64(), "Units labelled with their own class."),
        ("accuracy", pa.float64(), "correct / units: the CLIP-Dissect paper's final-layer accuracy."),
        ("tied", pa.int64(), "Units whose label is a tie (then correct rests on rounding)."),
        ("accuracy_with_ties", pa.float64(), "Share of units whose class is the label or tied with it."),
        ("text_similarity_mean", pa.float64(), "Mean CLIP text cosine between label and class name."),
    ),
    "summary_label_agreement": _schema(
        (
            "One row per (model, layer) labelled by both methods: how often CLIP-Dissect and Network Dissection "
            "agree on a unit's top-1 concept."
        ),
        _RUN,
        _MODEL,
        _LAYER,
        ("units", pa.int64(), "Units labelled by both methods."),
        (
            "agreeing",
            pa.int64(),
            "Units whose two labels share a concept (case-insensitive; a tie counts as each concept it ties).",
        ),
        ("rate", pa.float64(), "agreeing / units."),
        ("interpretable_units", pa.int64(), "Those units that Network Dissection finds interpretable."),
        ("interpretable_agreeing", pa.int64(), "Interpretable units whose two labels share a concept."),
        ("interpretable_rate", pa.float64(), "interpretable_agreeing / interpretable_units (null when none)."),
    ),
    "summary_pairs": _schema(
        "One row per (model, method pair): agreement statistics over the run's images.",
        _RUN,
        _MODEL,
        ("method_a", pa.string(), "First method (alphabetical)."),
        ("method_b", pa.string(), "Second method."),
        ("images", pa.int64(), "Images with both maps."),
        ("iou_mean", pa.float64(), "Mean IoU of the binarised maps."),
        ("iou_median", pa.float64(), "Median IoU."),
        ("iou_std", pa.float64(), "Population standard deviation of IoU."),
        ("spearman_mean", pa.float64(), "Mean Spearman rank correlation (NaN values skipped)."),
        ("spearman_median", pa.float64(), "Median Spearman rank correlation."),
        ("spearman_std", pa.float64(), "Population standard deviation of Spearman."),
        ("com_distance_mean", pa.float64(), "Mean centre-of-mass distance / image diagonal."),
    ),
    "summary_images": _schema(
        "One row per (model, image, target): how much the methods agree on it, ranked (best and worst images).",
        _RUN,
        _MODEL,
        _IMAGE,
        ("target", pa.int32(), "Class the maps explain."),
        ("class_name", pa.string(), "Name of that class."),
        ("pairs", pa.int64(), "Method pairs compared."),
        ("iou_mean", pa.float64(), "Mean IoU over the method pairs."),
        ("spearman_mean", pa.float64(), "Mean Spearman over the method pairs."),
        ("rank", pa.int32(), "1 for the image with the highest iou_mean (ties: by image_id)."),
    ),
    "summary_classes": _schema(
        "One row per (model, explained class): agreement averaged over its images, ranked.",
        _RUN,
        _MODEL,
        ("target", pa.int32(), "Class index the maps explain."),
        ("class_name", pa.string(), "Name of that class."),
        ("images", pa.int64(), "Images explained for this class."),
        ("iou_mean", pa.float64(), "Mean of the images' iou_mean."),
        ("spearman_mean", pa.float64(), "Mean of the images' spearman_mean."),
        ("rank", pa.int32(), "1 for the class with the highest iou_mean (ties: by class_name)."),
    ),
    "summary_methods": _schema(
        "One row per (model, explanation method): localization and faithfulness leaderboards.",
        _RUN,
        _MODEL,
        _METHOD,
        ("images", pa.int64(), "Images with a map of this method."),
        ("agreement_iou_mean", pa.float64(), "Mean IoU of this method's maps with every other method's."),
        ("localized_images", pa.int64(), "Images scored against ground truth."),
        ("pointing_accuracy", pa.float64(), "Share of pointing-game hits."),
        ("iou_gt_mean", pa.float64(), "Mean IoU with the ground-truth mask."),
        ("energy_in_gt_mean", pa.float64(), "Mean share of the map's mass inside the mask."),
        ("deletion_auc_mean", pa.float64(), "Mean deletion AUC (lower is better)."),
        ("insertion_auc_mean", pa.float64(), "Mean insertion AUC (higher is better)."),
        ("faithfulness", pa.float64(), "insertion_auc_mean - deletion_auc_mean (higher is better)."),
        (
            "road_mean",
            pa.float64(),
            "Mean ROAD score (grad-cam's ROADCombined, higher is better); null where ROAD was not computed.",
        ),
        (
            "localization_rank",
            pa.int32(),
            "1 for the best pointing_accuracy (ties: energy_in_gt_mean); null without ground truth.",
        ),
        ("faithfulness_rank", pa.int32(), "1 for the highest faithfulness; null without faithfulness rows."),
        ("control", pa.bool_(), "The method is a control: its maps carry no model information."),
        (
            "sanity_spearman",
            pa.float64(),
            "Mean Spearman of the last cascading step's maps (every block randomised) with the trained model's.",
        ),
        ("sanity_ssim", pa.float64(), "Mean SSIM of the last cascading step's maps with the trained model's."),
        (
            "sanity_passed",
            pa.bool_(),
            "sanity_spearman < 0.5: the maps depend on the weights (null without cascading rows).",
        ),
        ("smprt_spearman", pa.float64(), "sMPRT: mean Spearman of the last bottom-up step's smoothed maps."),
        (
            "emprt",
            pa.float64(),
            "eMPRT: mean relative rise of the map's entropy, trained -> fully randomised (higher is better).",
        ),
        ("random_logit_ssim", pa.float64(), "Mean SSIM of the map of a random other class with the explained one."),
        ("beaten_by_control", pa.string(), "Metrics on which a control beats this method (comma-separated)."),
        (
            "scores",
            pa.map_(pa.string(), pa.float64()),
            "Mean of each value in the scores table (metrics without a table of their own), by name.",
        ),
    ),
    "summary_sanity": _schema(
        "One row per (model, method, test, step): the randomisation curve, similarities averaged over the images.",
        _RUN,
        _MODEL,
        _METHOD,
        ("test", pa.string(), "cascading, smprt, emprt or random_logit."),
        ("step", pa.int32(), "Step (see the sanity table)."),
        ("layer", pa.string(), "Block randomised at this step."),
        ("images", pa.int64(), "Images with a map at this step."),
        ("spearman_mean", pa.float64(), "Mean Spearman with the step-0 map (null values skipped)."),
        ("ssim_mean", pa.float64(), "Mean SSIM with the step-0 map."),
        ("iou_mean", pa.float64(), "Mean top-q IoU with the step-0 map."),
        ("entropy_mean", pa.float64(), "Mean discrete entropy of the maps."),
    ),
    "summary_control_flags": _schema(
        (
            "One row per (model, metric, control, method) where a control explanation (no model information) scores "
            "better than a real method: that metric cannot tell good maps from bad on this data."
        ),
        _RUN,
        _MODEL,
        ("metric", pa.string(), "A summary_methods value (pointing_accuracy, deletion_auc_mean, ...)."),
        ("direction", pa.string(), "higher or lower is better, as the metric declares."),
        ("control", pa.string(), "The control method (control_random, control_gaussian, control_edges)."),
        ("method", pa.string(), "The real method it beats."),
        ("control_value", pa.float64(), "The control's value."),
        ("method_value", pa.float64(), "The method's value."),
    ),
    "summary_class_concepts": _schema(
        "One row per (model, labelling method, layer, class, concept): which concepts drive each class.",
        _RUN,
        _MODEL,
        _NEURON_METHOD,
        _LAYER,
        ("target", pa.int32(), "Class index."),
        ("class_name", pa.string(), "Class name."),
        ("concept", pa.string(), "Concept among the top concepts of at least one of the class's images."),
        ("category", pa.string(), "The concept's category."),
        ("images", pa.int64(), "The class's attributed images (all of them, not only those naming the concept)."),
        ("images_top", pa.int64(), "Images with the concept among their top concepts."),
        ("images_first", pa.int64(), "Images whose rank-1 concept it is."),
        ("share_mean", pa.float64(), "Mean share over the class's images (0 where not among an image's top concepts)."),
        ("contribution_mean", pa.float64(), "Mean contribution to the class logit, counted the same way."),
        ("rank", pa.int32(), "1 for the concept with the highest share_mean in the class (ties: by concept)."),
    ),
    "summary_concept_ablation": _schema(
        (
            "One row per (model, labelling method, layer): does zeroing each image's top concept lower the target "
            "probability more than zeroing as many random labelled units?"
        ),
        _RUN,
        _MODEL,
        _NEURON_METHOD,
        _LAYER,
        ("images", pa.int64(), "Images with both drops."),
        ("top_drop_mean", pa.float64(), "Mean target-probability drop with the top concept's units zeroed."),
        ("random_drop_mean", pa.float64(), "Mean drop with as many random labelled units zeroed."),
        ("top_beats_random", pa.float64(), "Share of images whose top-concept drop exceeds the random one."),
    ),
    "summary_lime_params": _schema(
        "One row per (model, LIME parameter set) of the search: its results over all images, ranked.",
        _RUN,
        _MODEL,
        ("params_json", pa.string(), "The parameter set as JSON."),
        ("trials", pa.int64(), "Images it was tried on."),
        ("objective_mean", pa.float64(), "Mean search objective (lower is better)."),
        ("objective_median", pa.float64(), "Median search objective."),
        ("deletion_auc_mean", pa.float64(), "Mean deletion AUC of its maps."),
        ("stability_mean", pa.float64(), "Mean agreement of its maps between the two search seeds."),
        ("seconds_mean", pa.float64(), "Mean wall time of a trial."),
        ("wins", pa.int64(), "Images for which it was the best parameter set."),
        ("rank", pa.int32(), "1 for the lowest objective_mean (the best parameters overall)."),
    ),
    "summary_lime_best": _schema(
        "One row per (model, image, target) of the LIME search: the image's best parameter set.",
        _RUN,
        _MODEL,
        _IMAGE,
        ("params_json", pa.string(), "The best parameter set as JSON."),
        ("objective", pa.float64(), "Its objective."),
        ("deletion_auc", pa.float64(), "Its deletion AUC."),
        ("stability", pa.float64(), "Its agreement between the two search seeds."),
        ("seconds", pa.float64(), "Its wall time."),
        _TARGET,
    ),
    "summary_lime_samples": _schema(
        "One row per model: the model evaluations its LIME maps used (adaptive LIME stops early), their uncertainty.",
        _RUN,
        _MODEL,
        ("maps", pa.int64(), "LIME maps (image, target)."),
        ("adaptive", pa.bool_(), "explain.lime.adaptive was on."),
        ("num_samples", pa.int64(), "explain.lime.num_samples (the cap with adaptive LIME)."),
        ("samples_used_mean", pa.float64(), "Mean perturbed samples (model evaluations) per map."),
        ("samples_used_max", pa.int64(), "Most samples one map used."),
        ("stopped_early_share", pa.float64(), "Share of maps whose adaptive stopping rule held before the cap."),
        ("std_error_mean", pa.float64(), "Mean standard error of a superpixel weight (probability units)."),
    ),
    "summary_drift_layers": _schema(
        (
            "One row per (baseline run, model, layer, labelling method): units whose top-1 concept changed since the "
            "baseline."
        ),
        _RUN,
        _BASELINE,
        _MODEL,
        _LAYER,
        _NEURON_METHOD,
        ("units", pa.int64(), "Units labelled in both runs."),
        ("changed", pa.int64(), "Units whose top-1 concept differs."),
        ("changed_share", pa.float64(), "changed / units."),
    ),
    "summary_drift_units": _schema(
        "One row per (baseline run, model, layer, method, unit) whose top-1 concept changed since the baseline.",
        _RUN,
        _BASELINE,
        _MODEL,
        _LAYER,
        _NEURON_METHOD,
        ("unit", pa.int32(), "Channel index in the layer."),
        ("concept_before", pa.string(), "Top-1 concept in the baseline run."),
        ("concept_after", pa.string(), "Top-1 concept in this run."),
        ("score_before", pa.float64(), "Its score in the baseline run."),
        ("score_after", pa.float64(), "Its score in this run."),
    ),
    "summary_drift_concepts": _schema(
        "One row per (baseline run, model, layer, method, concept) whose unit count changed: the histogram deltas.",
        _RUN,
        _BASELINE,
        _MODEL,
        _LAYER,
        _NEURON_METHOD,
        ("concept", pa.string(), "Top-1 concept."),
        ("units_before", pa.int64(), "Counted units in the baseline run."),
        ("units_after", pa.int64(), "Counted units in this run."),
        ("delta", pa.int64(), "units_after - units_before."),
    ),
    "summary_drift_class_concepts": _schema(
        "One row per (baseline run, model, method, layer, class, concept) whose mean share changed.",
        _RUN,
        _BASELINE,
        _MODEL,
        _NEURON_METHOD,
        _LAYER,
        ("class_name", pa.string(), "Class name."),
        ("concept", pa.string(), "Concept."),
        ("share_before", pa.float64(), "summary_class_concepts.share_mean in the baseline run (0 when absent)."),
        ("share_after", pa.float64(), "The same in this run (0 when absent)."),
        ("delta", pa.float64(), "share_after - share_before."),
    ),
    "summary_drift_metrics": _schema(
        "One row per (baseline run, model, subject, metric): explanation metrics before and after.",
        _RUN,
        _BASELINE,
        _MODEL,
        ("subject", pa.string(), "A method (gradcam, lime, ...) or a method pair written 'a vs b'."),
        (
            "metric",
            pa.string(),
            "A summary_methods or summary_pairs column (pointing_accuracy, deletion_auc_mean, iou_mean, ...).",
        ),
        ("before", pa.float64(), "Value in the baseline run."),
        ("after", pa.float64(), "Value in this run."),
        ("delta", pa.float64(), "after - before."),
    ),
}

ALL_TABLES: dict[str, pa.Schema] = {**TABLES, **SUMMARY_TABLES}


def schema_of(table: str) -> pa.Schema:
    """The schema of ``table`` (raw or summary); an unknown name lists the valid ones."""
    try:
        return ALL_TABLES[table]
    except KeyError:
        raise KeyError(f"unknown table {table!r}; tables: {sorted(ALL_TABLES)}") from None


def describe_tables() -> str:
    """Markdown reference of every table and column, generated from the schemas."""
    lines = [f"Schema version {SCHEMA_VERSION}.", ""]
    for name, schema in ALL_TABLES.items():
        lines += [
            f"#### `{name}`",
            "",
            schema.metadata[b"description"].decode(),
            "",
            "| column | type | meaning |",
            "|---|---|---|",
        ]
        lines += [f"| `{f.name}` | `{f.type}` | {f.metadata[b'description'].decode()} |" for f in schema]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
