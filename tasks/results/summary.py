"""The summary tables: a run's statistics, computed from its Parquet tables only.

Because it reads nothing but Parquet it runs anywhere and can be re-run alone
(``xai-audit summarize RUN_ID``; the flow's stage is :func:`xai_audit.tasks.results.tasks.summarize_task`).
Each ``summary_*`` table (schemas in :mod:`xai_audit.storage.schemas`) is one pure function of the raw
tables and is written as one file per run, so re-summarizing replaces it. The report, the Prefect
artifacts and the drift between runs read these tables; which way each leaderboard value is
better comes from the metric registry (:func:`method_scores`, :func:`wide_methods`).

Counting rule for concepts: a unit counts for its top-1 concept when CLIP-Dissect labelled it, or
when Network Dissection labelled it *and* found it interpretable (best IoU ≥ iou_threshold); a
unit below the threshold has no concept in Bau et al.'s sense.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from xai_audit.storage.parquet import ResultsStore, unreadable_files_named
from xai_audit.storage.schemas import SUMMARY_TABLES, TABLES
from xai_audit.tasks.dissect.base import counts_for_concept
from xai_audit.tasks.dissect.significance import FDR, benjamini_hochberg
from xai_audit.tasks.explain.registry import control_methods
from xai_audit.tasks.metrics.base import Score
from xai_audit.tasks.metrics.registry import summary_scores

TOP_CONCEPTS = 10
SANITY_PASS_BELOW = 0.5
"""A method passes model randomisation when its maps' mean Spearman with the trained model's, every block
randomised (the last cascading step), is below this: its maps depend on the weights."""
SUMMARY_UNIT = "summary"
UNCATEGORIZED = "uncategorized"
LAYER_KEY = ["model", "layer", "method"]

# What the summary reads of each raw table: never the maps themselves.
INPUT_COLUMNS = {
    "neurons": [
        "model",
        "layer",
        "unit",
        "method",
        "concept",
        "category",
        "score",
        "interpretable",
        "tied_with",
        "p_value",
    ],
    "label_checks": [
        "model",
        "check",
        "concept_set",
        "layer",
        "similarity",
        "unit",
        "correct",
        "text_similarity",
        "tied_with",
        "class_in_tie",
    ],
    "predictions": ["model", "image_id", "label", "label_name", "topk", "true_label"],
    "saliency": ["model", "image_id", "method", "target"],
    "agreement": ["model", "image_id", "method_a", "method_b", "iou", "spearman", "com_distance", "target"],
    "localization": ["model", "image_id", "method", "pointing_hit", "iou_gt", "energy_in_gt", "target"],
    "faithfulness": ["model", "image_id", "method", "deletion_auc", "insertion_auc", "road", "target"],
    "lime_trials": ["model", "image_id", "params_json", "objective", "seconds", "components_json", "best", "target"],
    "lime_uncertainty": [
        "model",
        "image_id",
        "target",
        "samples_used",
        "num_samples",
        "adaptive",
        "stopped_early",
        "std_errors",
    ],
    "scores": ["model", "image_id", "method", "metric", "value", "target"],
    "unit_contributions": ["model", "image_id", "target", "layer"],
    "sanity": ["model", "method", "test", "step", "layer", "image_id", "spearman", "ssim", "iou", "entropy"],
    "concept_attribution": [
        "model",
        "image_id",
        "target",
        "method",
        "layer",
        "concept",
        "category",
        "rank",
        "contribution",
        "share",
        "ablation_drop",
        "random_drop",
    ],
}
# summary tables that depend on a pair of runs (written by xai_audit.tasks.results.drift, not by summarize_run)
DRIFT_TABLES = tuple(name for name in SUMMARY_TABLES if name.startswith("summary_drift_"))
RUN_SUMMARY_TABLES = tuple(name for name in SUMMARY_TABLES if name not in DRIFT_TABLES)


DERIVED_SCORES: tuple[Score, ...] = (Score("faithfulness", "faithfulness", "higher", "insertion - deletion AUC"),)
"""summary_methods columns computed from other columns, not written by a metric:
faithfulness = insertion_auc_mean - deletion_auc_mean."""


def method_scores() -> list[Score]:
    """The metric columns of ``summary_methods``, in order: every registered value that has a
    column of its own (registry order), then :data:`DERIVED_SCORES`."""
    columns = set(SUMMARY_TABLES["summary_methods"].names)
    return [score for _, score in summary_scores() if score.summary in columns] + list(DERIVED_SCORES)


def _table_scores() -> list[Score]:
    """The registered values that live in the ``scores`` table (each summary a ``summary_methods.scores`` key)."""
    return [score for metric, score in summary_scores() if metric.table == "scores"]


def declared_score(summary: str) -> Score | None:
    """The registered or derived value whose ``summary`` is ``summary`` (a column or a ``scores`` key), if any."""
    return next((score for score in [*method_scores(), *_table_scores()] if score.summary == summary), None)


def score_map(value: object) -> dict[str, float]:
    """One ``summary_methods.scores`` cell as a dict: as computed (a dict) or read back from Parquet
    (a list of (key, value) pairs); {} for a null cell."""
    return dict(value) if isinstance(value, (Mapping, list, tuple)) else {}


def wide_methods(methods: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, Score | None]]]:
    """``summary_methods`` as a leaderboard: each key of its ``scores`` map becomes a column of its
    own (registered keys in registry order, then unknown ones by name) in place of the map; with
    the leaderboard's metric columns, each paired with the value that declares its direction
    (None for a ``scores`` key no registered metric declares)."""
    maps = [score_map(value) for value in methods["scores"]] if "scores" in methods else []
    present = {key for cell in maps for key in cell}
    registered = [score.summary for score in _table_scores() if score.summary in present]
    keys = registered + sorted(present - set(registered) - set(methods.columns))
    wide = methods.drop(columns="scores", errors="ignore")
    wide = wide.assign(
        **{key: pd.Series([cell.get(key, math.nan) for cell in maps], index=methods.index, dtype=float) for key in keys}
    )
    metrics = [(score.summary, score) for score in method_scores() if score.summary in wide]
    return wide, metrics + [(key, declared_score(key)) for key in keys]


def empty_frame(table: str) -> pd.DataFrame:
    """An empty frame with the summary table's columns (``run_id`` excluded)."""
    return pd.DataFrame({name: pd.Series(dtype=object) for name in SUMMARY_TABLES[table].names if name != "run_id"})


def _columns(table: str, frame: pd.DataFrame) -> pd.DataFrame:
    return frame[[name for name in SUMMARY_TABLES[table].names if name != "run_id"]].reset_index(drop=True)


def _ranked(frame: pd.DataFrame, group: list[str], by: list[str], ascending: list[bool]) -> pd.Series:
    """1-based rank inside each group after sorting by ``by`` (NaN last, ties by the later keys)."""
    ordered = frame.sort_values(by, ascending=ascending, na_position="last", kind="mergesort")
    return ordered.groupby(group, sort=False).cumcount().add(1).reindex(frame.index)


def counted_units(neurons: pd.DataFrame) -> pd.DataFrame:
    """Units that count for their concept (see the module docstring)."""
    counted = neurons[counts_for_concept(neurons)]
    return counted.assign(category=counted["category"].fillna(UNCATEGORIZED))


def concept_histograms(neurons: pd.DataFrame, top_n: int = TOP_CONCEPTS) -> pd.DataFrame:
    """``summary_concepts``: the ``top_n`` concepts of each (model, layer, method) by unit count."""
    counted = counted_units(neurons)
    if counted.empty:
        return empty_frame("summary_concepts")
    totals = neurons.groupby(LAYER_KEY).size().rename("total")
    frame = (
        counted.groupby(LAYER_KEY + ["concept"])
        .agg(units=("unit", "size"), score_mean=("score", "mean"), category=("category", "first"))
        .reset_index()
        .join(totals, on=LAYER_KEY)
    )
    frame["share"] = frame["units"] / frame["total"]
    frame["rank"] = _ranked(frame, LAYER_KEY, ["units", "concept"], [False, True])
    frame = frame[frame["rank"] <= top_n].sort_values(LAYER_KEY + ["rank"])
    return _columns("summary_concepts", frame)


def category_shares(neurons: pd.DataFrame) -> pd.DataFrame:
    """``summary_categories``: counted units per concept category of each layer."""
    counted = counted_units(neurons)
    if counted.empty:
        return empty_frame("summary_categories")
    totals = neurons.groupby(LAYER_KEY).size().rename("total")
    frame = counted.groupby(LAYER_KEY + ["category"]).size().rename("units").reset_index().join(totals, on=LAYER_KEY)
    frame["share"] = frame["units"] / frame["total"]
    return _columns("summary_categories", frame.sort_values(LAYER_KEY + ["category"]))


def concept_models(neurons: pd.DataFrame) -> pd.DataFrame:
    """``summary_concept_models``: concepts unique to one model or shared between models."""
    counted = counted_units(neurons)
    if counted.empty:
        return empty_frame("summary_concept_models")
    frame = counted.groupby(["model", "method", "concept"]).size().rename("units").reset_index()
    frame["n_models"] = frame.groupby(["method", "concept"])["model"].transform("nunique")
    frame["scope"] = np.where(frame["n_models"] > 1, "shared", "unique")
    return _columns(
        "summary_concept_models",
        frame.sort_values(["model", "method", "units", "concept"], ascending=[True, True, False, True]),
    )


LABEL_SOURCES = ["probe_set", "probe_images", "concept_set", "concepts"]


def layer_units(neurons: pd.DataFrame) -> pd.DataFrame:
    """``summary_layers``: labelled, counted and interpretable units of each layer."""
    if neurons.empty:
        return empty_frame("summary_layers")
    counted = counted_units(neurons)
    frame = neurons.groupby(LAYER_KEY).agg(
        units=("unit", "size"), score_mean=("score", "mean"), score_median=("score", "median")
    )
    frame["counted"] = counted.groupby(LAYER_KEY).size().reindex(frame.index).fillna(0).astype(int)
    frame["distinct_concepts"] = (
        counted.groupby(LAYER_KEY)["concept"].nunique().reindex(frame.index).fillna(0).astype(int)
    )
    tied = _with_ties(neurons)["tied_with"].map(_has_ties).groupby([neurons[k] for k in LAYER_KEY]).sum()
    frame["tied"] = tied.reindex(frame.index).fillna(0).astype(int)
    interpretable = neurons.assign(hit=neurons["interpretable"].eq(True)).groupby(LAYER_KEY)["hit"].sum()
    netdissect = frame.index.get_level_values("method") == "netdissect"
    frame["interpretable"] = pd.Series(interpretable.reindex(frame.index).to_numpy(), index=frame.index).where(
        netdissect
    )
    frame["interpretable_share"] = (frame["interpretable"] / frame["units"]).where(netdissect)
    frame = frame.join(significant_units(neurons))
    # where the labels came from (absent in runs written before neurons named it)
    frame = frame.join(neurons.reindex(columns=[*LAYER_KEY, *LABEL_SOURCES]).groupby(LAYER_KEY)[LABEL_SOURCES].first())
    return _columns("summary_layers", frame.reset_index().sort_values(LAYER_KEY))


def significant_units(neurons: pd.DataFrame) -> pd.DataFrame:
    """Per (model, layer, method): units with a p-value, and those significant after
    Benjamini–Hochberg at :data:`~xai_audit.tasks.dissect.significance.FDR` within the layer (null without p-values)."""
    p_values = neurons["p_value"] if "p_value" in neurons else pd.Series(np.nan, index=neurons.index)
    tested = neurons.assign(p_value=pd.to_numeric(p_values, errors="coerce"))
    rows = {}
    for key, group in tested.groupby(LAYER_KEY):
        finite = group["p_value"].dropna()
        rows[key] = (len(finite), int(benjamini_hochberg(finite.to_numpy(), FDR).sum()) if len(finite) else None)
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=["tested", "significant"])
    frame.index = pd.MultiIndex.from_tuples(frame.index, names=LAYER_KEY)
    frame["significant"] = frame["significant"].astype("Int64")
    frame["tested"] = frame["tested"].where(frame["tested"] > 0).astype("Int64")
    frame["significant_share"] = frame["significant"] / frame["tested"]
    return frame


def _with_ties(neurons: pd.DataFrame) -> pd.DataFrame:
    """``neurons`` with a ``tied_with`` column (null where the rows predate it)."""
    return neurons if "tied_with" in neurons else neurons.assign(tied_with=None)


def _has_ties(tied_with: object) -> bool:
    return tied_with is not None and not (isinstance(tied_with, float) and math.isnan(tied_with)) and len(tied_with) > 0


def _label_set(concept: object, tied_with: object) -> set[str]:
    """A unit's label as a set: its concept and the concepts tied with it (lower-cased)."""
    names = [concept] + (list(tied_with) if _has_ties(tied_with) else [])
    return {str(name).strip().lower() for name in names if isinstance(name, str)}


def label_agreement(neurons: pd.DataFrame) -> pd.DataFrame:
    """``summary_label_agreement``: CLIP-Dissect vs Network Dissection top-1 labels per layer; a
    tie counts as every concept it ties, so agreement never rests on rounding."""
    key = ["model", "layer", "unit"]
    neurons = _with_ties(neurons)
    clip = neurons.loc[neurons["method"] == "clip_dissect", key + ["concept", "tied_with"]]
    net = neurons.loc[neurons["method"] == "netdissect", key + ["concept", "tied_with", "interpretable"]]
    both = clip.merge(net, on=key, suffixes=("_clip", "_net"))
    if both.empty:
        return empty_frame("summary_label_agreement")
    both["agree"] = [
        bool(_label_set(*clip_label) & _label_set(*net_label))
        for clip_label, net_label in zip(
            zip(both["concept_clip"], both["tied_with_clip"]), zip(both["concept_net"], both["tied_with_net"])
        )
    ]
    both["hit"] = both["interpretable"].eq(True)
    both["hit_agree"] = both["hit"] & both["agree"]
    frame = (
        both.groupby(["model", "layer"])
        .agg(
            units=("unit", "size"),
            agreeing=("agree", "sum"),
            interpretable_units=("hit", "sum"),
            interpretable_agreeing=("hit_agree", "sum"),
        )
        .reset_index()
    )
    frame["rate"] = frame["agreeing"] / frame["units"]
    frame["interpretable_rate"] = (frame["interpretable_agreeing"] / frame["interpretable_units"]).where(
        frame["interpretable_units"] > 0
    )
    return _columns("summary_label_agreement", frame)


def label_checks(checks: pd.DataFrame) -> pd.DataFrame:
    """``summary_label_checks``: accuracy and mean text similarity of each label self-test."""
    if checks.empty:
        return empty_frame("summary_label_checks")
    key = ["model", "check", "concept_set", "layer", "similarity"]
    checks = checks.assign(
        correct=checks["correct"].astype(bool),
        in_tie=checks["class_in_tie"].astype(bool),
        tie=checks["tied_with"].map(_has_ties),
    )
    frame = (
        checks.groupby(key)
        .agg(
            units=("unit", "size"),
            correct=("correct", "sum"),
            tied=("tie", "sum"),
            in_tie=("in_tie", "sum"),
            text_similarity_mean=("text_similarity", "mean"),
        )
        .reset_index()
    )
    frame["accuracy"] = frame["correct"] / frame["units"]
    frame["accuracy_with_ties"] = frame["in_tie"] / frame["units"]
    return _columns("summary_label_checks", frame.sort_values(key))


def _population_std(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.std(ddof=0)) if len(values) else math.nan


def pair_statistics(agreement: pd.DataFrame) -> pd.DataFrame:
    """``summary_pairs``: IoU and Spearman statistics of each method pair."""
    if agreement.empty:
        return empty_frame("summary_pairs")
    frame = (
        agreement.groupby(["model", "method_a", "method_b"])
        .agg(
            images=("image_id", "size"),
            iou_mean=("iou", "mean"),
            iou_median=("iou", "median"),
            iou_std=("iou", _population_std),
            spearman_mean=("spearman", "mean"),
            spearman_median=("spearman", "median"),
            spearman_std=("spearman", _population_std),
            com_distance_mean=("com_distance", "mean"),
        )
        .reset_index()
    )
    return _columns("summary_pairs", frame)


def class_names(predictions: pd.DataFrame) -> dict[tuple[str, int], str]:
    """Every (model, class index) → class name the predictions mention."""
    names: dict[tuple[str, int], str] = {}
    for model, topk in zip(predictions["model"], predictions["topk"]):
        for entry in topk if topk is not None else ():
            names[(model, int(entry["label"]))] = entry["name"]
    return names


def _image_targets(saliency: pd.DataFrame, predictions: pd.DataFrame) -> pd.DataFrame:
    """(model, image_id, target) → the class's name, for each class an image's maps explain."""
    targets = saliency.drop_duplicates(["model", "image_id", "target"])[["model", "image_id", "target"]]
    names = class_names(predictions)
    targets = targets.assign(
        class_name=[
            names.get((model, int(target)), str(int(target))) if pd.notna(target) else None
            for model, target in zip(targets["model"], targets["target"])
        ]
    )
    return targets


def image_agreement(agreement: pd.DataFrame, saliency: pd.DataFrame, predictions: pd.DataFrame) -> pd.DataFrame:
    """``summary_images``: each (image, target)'s mean agreement over method pairs, ranked best first."""
    if agreement.empty:
        return empty_frame("summary_images")
    frame = (
        agreement.groupby(["model", "image_id", "target"], dropna=False)
        .agg(pairs=("iou", "size"), iou_mean=("iou", "mean"), spearman_mean=("spearman", "mean"))
        .reset_index()
    )
    frame = frame.merge(_image_targets(saliency, predictions), on=["model", "image_id", "target"], how="left")
    frame["rank"] = _ranked(frame, ["model"], ["iou_mean", "image_id", "target"], [False, True, True])
    return _columns("summary_images", frame.sort_values(["model", "rank"]))


def class_agreement(images: pd.DataFrame) -> pd.DataFrame:
    """``summary_classes``: agreement per explained class (from ``summary_images``), ranked."""
    images = images.dropna(subset=["target"])
    if images.empty:
        return empty_frame("summary_classes")
    frame = (
        images.groupby(["model", "target", "class_name"])
        .agg(images=("image_id", "size"), iou_mean=("iou_mean", "mean"), spearman_mean=("spearman_mean", "mean"))
        .reset_index()
    )
    frame["rank"] = _ranked(frame, ["model"], ["iou_mean", "class_name"], [False, True])
    return _columns("summary_classes", frame.sort_values(["model", "rank"]))


def score_means(scores: pd.DataFrame) -> pd.Series:
    """(model, method) → {value name: mean} of the ``scores`` table (values registered under
    another ``summary`` name are keyed by it; null values skipped)."""
    if scores.empty:
        return pd.Series(dtype=object, name="scores")
    renamed = {score.column: score.summary for score in _table_scores()}
    scores = scores.dropna(subset=["value"])
    scores = scores.assign(metric=[renamed.get(name, name) for name in scores["metric"]])
    means = scores.groupby(["model", "method", "metric"])["value"].mean()
    return pd.Series(
        {
            key: {metric: float(value) for metric, value in rows.droplevel([0, 1]).items()}
            for key, rows in means.groupby(level=["model", "method"])
        },
        dtype=object,
        name="scores",
    )


def method_leaderboard(
    saliency: pd.DataFrame,
    agreement: pd.DataFrame,
    localization: pd.DataFrame,
    faithfulness: pd.DataFrame,
    scores: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """``summary_methods``: agreement, localization and faithfulness of each method, with ranks, and
    the means of the ``scores`` table's values."""
    if saliency.empty:  # every metric is computed from a stored map
        return empty_frame("summary_methods")
    key = ["model", "method"]
    frames = [saliency.groupby(key).size().rename("images")]
    if not agreement.empty:
        sides = pd.concat(
            [
                agreement[["model", "method_a", "iou"]].rename(columns={"method_a": "method"}),
                agreement[["model", "method_b", "iou"]].rename(columns={"method_b": "method"}),
            ]
        )
        frames.append(sides.groupby(key)["iou"].mean().rename("agreement_iou_mean"))
    if not localization.empty:
        located = localization.assign(pointing_hit=localization["pointing_hit"].astype(float))
        frames.append(
            located.groupby(key).agg(
                localized_images=("image_id", "size"),
                pointing_accuracy=("pointing_hit", "mean"),
                iou_gt_mean=("iou_gt", "mean"),
                energy_in_gt_mean=("energy_in_gt", "mean"),
            )
        )
    if not faithfulness.empty:
        frames.append(
            faithfulness.groupby(key).agg(
                deletion_auc_mean=("deletion_auc", "mean"),
                insertion_auc_mean=("insertion_auc", "mean"),
                road_mean=("road", "mean"),
            )
        )
    means = score_means(scores if scores is not None else pd.DataFrame())
    if not means.empty:
        frames.append(means.rename_axis(key))
    frame = pd.concat(frames, axis=1).reset_index()
    frame = frame.reindex(
        columns=[*frame.columns, *[c for c in SUMMARY_TABLES["summary_methods"].names if c not in frame.columns]]
    )
    frame["images"] = frame["images"].fillna(0)
    frame["localized_images"] = frame["localized_images"].fillna(0)
    frame["faithfulness"] = frame["insertion_auc_mean"] - frame["deletion_auc_mean"]
    frame["localization_rank"] = _ranked(
        frame, ["model"], ["pointing_accuracy", "energy_in_gt_mean", "method"], [False, False, True]
    ).where(frame["pointing_accuracy"].notna())
    frame["faithfulness_rank"] = _ranked(frame, ["model"], ["faithfulness", "method"], [False, True]).where(
        frame["faithfulness"].notna()
    )
    return _columns("summary_methods", frame.sort_values(key))


def _with_components(trials: pd.DataFrame) -> pd.DataFrame:
    parts = [json.loads(text) if isinstance(text, str) else {} for text in trials["components_json"]]
    return trials.assign(
        deletion_auc=[p.get("deletion_auc", math.nan) for p in parts],
        stability=[p.get("stability", math.nan) for p in parts],
    )


def lime_parameters(trials: pd.DataFrame) -> pd.DataFrame:
    """``summary_lime_params``: each searched LIME parameter set over all images, best first."""
    if trials.empty:
        return empty_frame("summary_lime_params")
    trials = _with_components(trials).assign(win=trials["best"].eq(True))
    frame = (
        trials.groupby(["model", "params_json"])
        .agg(
            trials=("image_id", "size"),
            objective_mean=("objective", "mean"),
            objective_median=("objective", "median"),
            deletion_auc_mean=("deletion_auc", "mean"),
            stability_mean=("stability", "mean"),
            seconds_mean=("seconds", "mean"),
            wins=("win", "sum"),
        )
        .reset_index()
    )
    frame["rank"] = _ranked(frame, ["model"], ["objective_mean", "params_json"], [True, True])
    return _columns("summary_lime_params", frame.sort_values(["model", "rank"]))


def lime_best(trials: pd.DataFrame) -> pd.DataFrame:
    """``summary_lime_best``: each image's best LIME parameter set."""
    best = trials[trials["best"].eq(True)]
    if best.empty:
        return empty_frame("summary_lime_best")
    return _columns("summary_lime_best", _with_components(best).sort_values(["model", "image_id"]))


def lime_samples(uncertainty: pd.DataFrame) -> pd.DataFrame:
    """``summary_lime_samples``: per model, the samples its LIME maps used and their weights' mean standard error."""
    if uncertainty.empty:
        return empty_frame("summary_lime_samples")
    frame = uncertainty.assign(
        std_error=[float(np.nanmean(errors)) if len(errors) else np.nan for errors in uncertainty["std_errors"]],
        early=uncertainty["stopped_early"].eq(True),
    )
    frame = (
        frame.groupby("model")
        .agg(
            maps=("image_id", "size"),
            adaptive=("adaptive", "max"),
            num_samples=("num_samples", "max"),
            samples_used_mean=("samples_used", "mean"),
            samples_used_max=("samples_used", "max"),
            stopped_early_share=("early", "mean"),
            std_error_mean=("std_error", "mean"),
        )
        .reset_index()
    )
    return _columns("summary_lime_samples", frame.sort_values("model"))


def class_concepts(attribution: pd.DataFrame, contributions: pd.DataFrame, predictions: pd.DataFrame) -> pd.DataFrame:
    """``summary_class_concepts``: the class x concept matrix, mean shares over each class's images."""
    if attribution.empty:
        return empty_frame("summary_class_concepts")
    images = contributions.groupby(["model", "layer", "target"])["image_id"].nunique().rename("images")
    key = ["model", "method", "layer", "target", "concept"]
    frame = (
        attribution.assign(first=attribution["rank"].eq(1))
        .groupby(key)
        .agg(
            images_top=("image_id", "size"),
            images_first=("first", "sum"),
            share_sum=("share", "sum"),
            contribution_sum=("contribution", "sum"),
            category=("category", "first"),
        )
        .reset_index()
    )
    frame = frame.join(images, on=["model", "layer", "target"])
    frame["share_mean"] = frame["share_sum"] / frame["images"]
    frame["contribution_mean"] = frame["contribution_sum"] / frame["images"]
    names = class_names(predictions)
    frame["class_name"] = [
        names.get((model, int(target)), str(int(target))) for model, target in zip(frame["model"], frame["target"])
    ]
    frame["rank"] = _ranked(frame, ["model", "method", "layer", "target"], ["share_mean", "concept"], [False, True])
    return _columns("summary_class_concepts", frame.sort_values(["model", "method", "layer", "class_name", "rank"]))


def concept_ablation(attribution: pd.DataFrame) -> pd.DataFrame:
    """``summary_concept_ablation``: the top concept's ablation drop against random units', per layer."""
    both = attribution.dropna(subset=["ablation_drop", "random_drop"]) if not attribution.empty else attribution
    if both.empty:
        return empty_frame("summary_concept_ablation")
    both = both.assign(beats=both["ablation_drop"] > both["random_drop"])
    frame = (
        both.groupby(["model", "method", "layer"])
        .agg(
            images=("image_id", "size"),
            top_drop_mean=("ablation_drop", "mean"),
            random_drop_mean=("random_drop", "mean"),
            top_beats_random=("beats", "mean"),
        )
        .reset_index()
    )
    return _columns("summary_concept_ablation", frame)


def sanity_curves(sanity: pd.DataFrame) -> pd.DataFrame:
    """``summary_sanity``: each method's similarity to its step-0 map per test and step, over the images."""
    if sanity.empty:
        return empty_frame("summary_sanity")
    key = ["model", "method", "test", "step"]
    frame = (
        sanity.groupby(key)
        .agg(
            layer=("layer", "first"),
            images=("image_id", "size"),
            spearman_mean=("spearman", "mean"),
            ssim_mean=("ssim", "mean"),
            iou_mean=("iou", "mean"),
            entropy_mean=("entropy", "mean"),
        )
        .reset_index()
    )
    return _columns("summary_sanity", frame.sort_values(key))


def _last_step(sanity: pd.DataFrame, test: str) -> pd.DataFrame:
    """The rows of each (model, method)'s last step of ``test``."""
    rows = sanity[sanity["test"] == test]
    last = rows.groupby(["model", "method"])["step"].transform("max")
    return rows[(rows["step"] == last) & (last > 0)]


def sanity_verdicts(sanity: pd.DataFrame) -> pd.DataFrame:
    """(model, method) -> the ``summary_methods`` sanity columns: final-step similarities, eMPRT, verdict."""
    key = ["model", "method"]
    columns = ["sanity_spearman", "sanity_ssim", "smprt_spearman", "emprt", "random_logit_ssim"]
    if sanity.empty:
        return pd.DataFrame(columns=[*key, *columns, "sanity_passed"])
    frames = []
    cascading = _last_step(sanity, "cascading").groupby(key)
    frames += [cascading["spearman"].mean().rename("sanity_spearman"), cascading["ssim"].mean().rename("sanity_ssim")]
    frames.append(_last_step(sanity, "smprt").groupby(key)["spearman"].mean().rename("smprt_spearman"))
    emprt = sanity[sanity["test"] == "emprt"]
    before = emprt[emprt["step"] == 0].set_index([*key, "image_id"])["entropy"]
    after = _last_step(sanity, "emprt").set_index([*key, "image_id"])["entropy"]
    rise = ((after - before.reindex(after.index)) / before.reindex(after.index).where(lambda h: h != 0)).dropna()
    frames.append(rise.groupby(level=key).mean().rename("emprt"))
    logit = sanity[(sanity["test"] == "random_logit") & (sanity["step"] == 1)]
    frames.append(logit.groupby(key)["ssim"].mean().rename("random_logit_ssim"))
    frame = pd.concat(frames, axis=1).reindex(columns=columns).reset_index()
    frame["sanity_passed"] = (
        (frame["sanity_spearman"] < SANITY_PASS_BELOW).astype(object).where(frame["sanity_spearman"].notna())
    )
    return frame


def _agreement_summaries() -> set[str]:
    """Summary names of agreement values: agreeing with other methods says nothing of a map's quality."""
    return {score.summary for metric, score in summary_scores() if metric.category == "agreement"}


def control_flags(methods: pd.DataFrame) -> pd.DataFrame:
    """``summary_control_flags``: every (metric, control, real method) of a model where the control scores
    strictly better than the method, in the metric's declared direction."""
    if methods.empty or "control" not in methods:
        return empty_frame("summary_control_flags")
    wide, metrics = wide_methods(methods)
    skip = _agreement_summaries()
    rows = []
    for model, frame in wide.groupby("model", sort=True):
        is_control = frame["control"].eq(True)
        controls, real = frame[is_control], frame[~is_control]
        for column, score in metrics:
            if score is None or column in skip:
                continue
            for control in controls.itertuples():
                for method in real.itertuples():
                    a, b = getattr(control, column), getattr(method, column)
                    if pd.isna(a) or pd.isna(b):
                        continue
                    if (a > b) if score.direction == "higher" else (a < b):
                        rows.append(
                            {
                                "model": model,
                                "metric": column,
                                "direction": score.direction,
                                "control": control.method,
                                "method": method.method,
                                "control_value": float(a),
                                "method_value": float(b),
                            }
                        )
    if not rows:
        return empty_frame("summary_control_flags")
    return _columns("summary_control_flags", pd.DataFrame(rows))


def with_sanity(methods: pd.DataFrame, sanity: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``summary_methods`` with its control flag and sanity columns filled, and ``summary_control_flags``."""
    if methods.empty:
        return methods, empty_frame("summary_control_flags")
    controls = control_methods()
    methods = methods.assign(control=[method in controls for method in methods["method"]])
    verdicts = sanity_verdicts(sanity)
    filled = methods.drop(columns=[c for c in verdicts.columns if c not in ("model", "method")], errors="ignore")
    filled = filled.merge(verdicts, on=["model", "method"], how="left")
    flags = control_flags(filled)
    beaten = flags.groupby(["model", "method"])["metric"].agg(lambda names: ", ".join(dict.fromkeys(names)))
    filled["beaten_by_control"] = [beaten.get(key) for key in zip(filled["model"], filled["method"])]
    return _columns("summary_methods", filled), flags


def read_inputs(store: ResultsStore, run_id: str) -> dict[str, pd.DataFrame]:
    """The columns of the raw tables that the summary needs, for one run."""
    with unreadable_files_named(store):
        return {
            table: store.dataset(table, run_id).to_table(columns=columns).to_pandas()
            for table, columns in INPUT_COLUMNS.items()
        }


def _input(inputs: Mapping[str, pd.DataFrame], table: str) -> pd.DataFrame:
    """A raw table of ``inputs``, empty (with its columns) when the caller has none (older callers)."""
    return inputs[table] if table in inputs else pd.DataFrame(columns=INPUT_COLUMNS[table])


def summary_tables(inputs: Mapping[str, pd.DataFrame], top_n: int = TOP_CONCEPTS) -> dict[str, pd.DataFrame]:
    """Every per-run summary table from the raw tables (see :data:`INPUT_COLUMNS`)."""
    neurons, agreement = inputs["neurons"], inputs["agreement"]
    attribution = _input(inputs, "concept_attribution")
    images = image_agreement(agreement, inputs["saliency"], inputs["predictions"])
    sanity = _input(inputs, "sanity")
    methods, flags = with_sanity(
        method_leaderboard(
            inputs["saliency"], agreement, inputs["localization"], inputs["faithfulness"], inputs.get("scores")
        ),
        sanity,
    )
    return {
        "summary_concepts": concept_histograms(neurons, top_n),
        "summary_categories": category_shares(neurons),
        "summary_concept_models": concept_models(neurons),
        "summary_layers": layer_units(neurons),
        "summary_label_agreement": label_agreement(neurons),
        "summary_label_checks": label_checks(_input(inputs, "label_checks")),
        "summary_pairs": pair_statistics(agreement),
        "summary_images": images,
        "summary_classes": class_agreement(images),
        "summary_methods": methods,
        "summary_sanity": sanity_curves(sanity),
        "summary_control_flags": flags,
        "summary_class_concepts": class_concepts(
            attribution, _input(inputs, "unit_contributions"), inputs["predictions"]
        ),
        "summary_concept_ablation": concept_ablation(attribution),
        "summary_lime_params": lime_parameters(inputs["lime_trials"]),
        "summary_lime_best": lime_best(inputs["lime_trials"]),
        "summary_lime_samples": lime_samples(_input(inputs, "lime_uncertainty")),
    }


def table_rows(frame: pd.DataFrame) -> list[dict]:
    """A frame as rows for :meth:`ResultsStore.write`, with every missing value as null."""
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def require_run(store: ResultsStore, run_id: str) -> None:
    """Raise ``KeyError`` naming the known runs when ``run_id`` has no manifest."""
    if not store.files("runs", run_id):
        known = store.run_ids()
        raise KeyError(f"no run {run_id!r} under {store.root}; runs: {', '.join(known[-5:]) or 'none'}")


def summarize_run(store: ResultsStore, run_id: str, top_n: int = TOP_CONCEPTS) -> dict[str, int]:
    """Compute and write every per-run summary table of ``run_id``; returns rows per table."""
    require_run(store, run_id)
    tables = summary_tables(read_inputs(store, run_id), top_n)
    for table, frame in tables.items():
        store.write(table, run_id, SUMMARY_UNIT, table_rows(frame))
    return {table: len(frame) for table, frame in tables.items()}


def load_summary(store: ResultsStore, run_id: str) -> dict[str, pd.DataFrame]:
    """The run's summary tables as written, computed in memory when the run was never summarized."""
    if not all(store.has_unit(table, run_id, SUMMARY_UNIT) for table in RUN_SUMMARY_TABLES):
        return summary_tables(read_inputs(store, run_id))
    return {table: store.read(table, run_id).drop(columns="run_id") for table in RUN_SUMMARY_TABLES}


def raw_counts(store: ResultsStore, run_id: str) -> dict[str, int]:
    """Rows per raw table of one run (``runs`` excluded)."""
    return {table: store.dataset(table, run_id).count_rows() for table in TABLES if table != "runs"}
