"""The summary tables: a run's statistics, computed from its Parquet tables only.

Because it reads nothing but Parquet it runs anywhere and can be re-run alone
(``xai-audit summarize RUN_ID``; the flow's stage is :func:`tasks.results.tasks.summarize_task`).
Each ``summary_*`` table (schemas in :mod:`storage.schemas`) is one pure function of the raw
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

from storage.integrity import unreadable_files_named
from storage.parquet import ResultsStore
from storage.schemas import SUMMARY_TABLES, TABLES
from tasks.dissect.base import counts_for_concept
from tasks.metrics.base import Score
from tasks.metrics.registry import summary_scores

TOP_CONCEPTS = 10
SUMMARY_UNIT = "summary"
UNCATEGORIZED = "uncategorized"
LAYER_KEY = ["model", "layer", "method"]

# What the summary reads of each raw table: never the maps themselves.
INPUT_COLUMNS = {
    "neurons": ["model", "layer", "unit", "method", "concept", "category", "score", "interpretable", "tied_with"],
    "predictions": ["model", "image_id", "label", "label_name", "topk", "true_label"],
    "saliency": ["model", "image_id", "method", "target"],
    "agreement": ["model", "image_id", "method_a", "method_b", "iou", "spearman", "com_distance", "target"],
    "localization": ["model", "image_id", "method", "pointing_hit", "iou_gt", "energy_in_gt", "target"],
    "faithfulness": ["model", "image_id", "method", "deletion_auc", "insertion_auc", "road", "target"],
    "lime_trials": ["model", "image_id", "params_json", "objective", "seconds", "components_json", "best", "target"],
    "scores": ["model", "image_id", "method", "metric", "value", "target"],
    "unit_contributions": ["model", "image_id", "target", "layer"],
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
# summary tables that depend on a pair of runs (written by tasks.results.drift, not by summarize_run)
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
    return _columns("summary_layers", frame.reset_index().sort_values(LAYER_KEY))


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
    return {
        "summary_concepts": concept_histograms(neurons, top_n),
        "summary_categories": category_shares(neurons),
        "summary_concept_models": concept_models(neurons),
        "summary_layers": layer_units(neurons),
        "summary_label_agreement": label_agreement(neurons),
        "summary_pairs": pair_statistics(agreement),
        "summary_images": images,
        "summary_classes": class_agreement(images),
        "summary_methods": method_leaderboard(
            inputs["saliency"], agreement, inputs["localization"], inputs["faithfulness"], inputs.get("scores")
        ),
        "summary_class_concepts": class_concepts(
            attribution, _input(inputs, "unit_contributions"), inputs["predictions"]
        ),
        "summary_concept_ablation": concept_ablation(attribution),
        "summary_lime_params": lime_parameters(inputs["lime_trials"]),
        "summary_lime_best": lime_best(inputs["lime_trials"]),
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
