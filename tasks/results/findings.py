"""The findings digest: what a run found, in a few dozen lines, from its summary tables alone.

Printed at the end of ``xai-audit run`` and by ``xai-audit findings RUN_ID``, shown on the
report's first screen and in the run's Prefect artifact; all four read the same tables
(:func:`xai_audit.tasks.results.summary.load_summary`, :func:`xai_audit.tasks.results.drift.read_drift`), so they
cannot disagree. Per model: the top concepts of each labelled layer and method with their unit
counts, Network Dissection's interpretable share, CLIP-Dissect vs Network Dissection agreement,
the explanation methods' leaderboard, the most and least agreed-on image and class; then drift
against the previous run and failed items. Concept attributions add each class's top concepts
and the ablation check of each image's top concept.
"""

from __future__ import annotations

import math

import pandas as pd

from xai_audit.storage.parquet import ResultsStore
from xai_audit.tasks.results.drift import read_drift
from xai_audit.tasks.results.summary import SANITY_PASS_BELOW, declared_score, load_summary

TOP_CONCEPTS = 3
CLASS_CONCEPTS = 2
CLASSES_SHOWN = 10
FAILURE_REASONS = 3
MESSAGE_CHARS = 160
DRIFT_METRICS_SHOWN = 3
# The leaderboard's columns, best method first by the first one that has values.
LEADERBOARD = ("pointing_accuracy", "deletion_auc_mean", "insertion_auc_mean", "agreement_iou_mean")


def number(value: object) -> str:
    """A score as the digest prints it (3 significant decimals; "-" when missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.3f}"


def _label_source_lines(layers: pd.DataFrame) -> list[str]:
    """Which probe set and candidate set every label of the model was chosen from, per method."""
    if "probe_set" not in layers or layers["probe_set"].isna().all():
        return []
    sources = layers.dropna(subset=["probe_set"]).drop_duplicates(
        ["method", "probe_set", "probe_images", "concept_set", "concepts"]
    )
    parts = [
        f"{r.method} from probe set {r.probe_set} ({int(r.probe_images):,} images), concepts: {r.concept_set} "
        f"({int(r.concepts):,})"
        for r in sources.sort_values("method").itertuples()
    ]
    return [f"  labels: {'; '.join(parts)}"]


def _model_lines(model: str, summary: dict[str, pd.DataFrame]) -> list[str]:
    lines = [f"{model}:"]
    layers = summary["summary_layers"]
    layers = layers[layers["model"] == model]
    lines += _label_source_lines(layers)
    concepts = summary["summary_concepts"]
    for row in layers.itertuples():
        mine = concepts[
            (concepts["model"] == model) & (concepts["layer"] == row.layer) & (concepts["method"] == row.method)
        ]
        top = ", ".join(f"{r.concept} {r.units}" for r in mine.sort_values("rank").head(TOP_CONCEPTS).itertuples())
        counted = (
            f"{int(row.interpretable)}/{row.units} interpretable"
            if row.method == "netdissect" and not pd.isna(row.interpretable)
            else f"{row.units} units"
        )
        ties = getattr(row, "tied", 0)
        tied = f", {int(ties)} tied" if ties and not pd.isna(ties) else ""
        significant = getattr(row, "significant", None)
        tested = getattr(row, "tested", None)
        if significant is not None and not pd.isna(significant):
            tied += f", {int(significant)}/{int(tested)} significant"
        lines.append(f"  {row.layer} {row.method}: {top or '(no counted units)'} ({counted}{tied})")
    checks = summary.get("summary_label_checks")
    if checks is not None and not checks.empty:
        for row in checks[checks["model"] == model].itertuples():
            lines.append(
                f"  label self-test ({row.check}, {row.concept_set} concepts, {row.similarity}): accuracy "
                f"{number(row.accuracy)} ({int(row.correct)}/{int(row.units)}; {int(row.tied)} tied, class among the "
                f"tied labels {number(row.accuracy_with_ties)}), text similarity {number(row.text_similarity_mean)}"
            )
    agreement = summary["summary_label_agreement"]
    agreement = agreement[agreement["model"] == model]
    if not agreement.empty:
        rates = ", ".join(f"{r.layer} {number(r.interpretable_rate)}" for r in agreement.itertuples())
        lines.append(f"  labels agree (CLIP-Dissect = Network Dissection, interpretable units): {rates}")
    methods = summary["summary_methods"]
    methods = methods[methods["model"] == model]
    if not methods.empty:
        columns = [c for c in LEADERBOARD if c in methods and methods[c].notna().any()]
        scores = [declared_score(column) for column in columns]
        first = scores[0] if scores else None
        if first is not None:
            methods = methods.sort_values(columns[0], ascending=first.direction == "lower", na_position="last")
        header = ", ".join(f"{score.label} {score.arrow}" for score in scores)
        lines.append(f"  methods ({header}):")
        for row in methods.to_dict("records"):
            lines.append(
                f"    {row['method']}{method_marks(row)}: " + " / ".join(number(row[column]) for column in columns)
            )
    lines += _sanity_lines(model, summary)
    lines += _lime_lines(model, summary)
    lines += _concept_lines(model, summary)
    for table, what in (("summary_images", "image"), ("summary_classes", "class")):
        ranked = summary[table]
        ranked = ranked[ranked["model"] == model].sort_values("rank")
        if len(ranked) >= 2:
            best, worst = ranked.iloc[0], ranked.iloc[-1]
            name = "image_id" if what == "image" else "class_name"
            # with several targets per image, an image's row is one of its classes: name it
            several = what == "image" and ranked["image_id"].duplicated().any()

            def called(row: pd.Series, name: str = name, several: bool = several) -> str:
                return f"{row[name]} for {row['class_name']}" if several else str(row[name])

            lines.append(
                f"  {what} the methods agree on most: {called(best)} (IoU {number(best['iou_mean'])}), "
                f"least: {called(worst)} (IoU {number(worst['iou_mean'])})"
            )
    return lines


def flag(value: object) -> bool | None:
    """A nullable boolean cell as True, False or None (Parquet gives numpy, Python or missing values)."""
    missing = value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))
    return None if missing else bool(value)


def method_marks(row: dict) -> str:
    """What the leaderboards append to a method's name: a control, a failed sanity check."""
    marks = ["control"] if flag(row.get("control")) is True else []
    if flag(row.get("sanity_passed")) is False:
        marks.append("fails sanity")
    return f" ({', '.join(marks)})" if marks else ""


def _sanity_lines(model: str, summary: dict[str, pd.DataFrame]) -> list[str]:
    """The sanity verdicts (cascading randomisation) and the metrics that a control beats a real method on."""
    lines = []
    methods = summary["summary_methods"]
    methods = methods[methods["model"] == model]
    if "sanity_spearman" in methods and methods["sanity_spearman"].notna().any():
        checked = methods[methods["sanity_spearman"].notna()]
        verdicts = ", ".join(
            f"{r['method']} {number(r['sanity_spearman'])} {'pass' if flag(r['sanity_passed']) else 'FAIL'}"
            for r in checked.to_dict("records")
        )
        lines.append(
            f"  sanity (Spearman with the trained model's map, every block randomised; < {SANITY_PASS_BELOW} passes): "
            f"{verdicts}"
        )
        failing = [r["method"] for r in checked.to_dict("records") if flag(r["sanity_passed"]) is False]
        real = [name for name in failing if not _is_control(methods, name)]
        if real:
            lines.append(f"  maps that do not depend on the model's weights (explaining the image): {', '.join(real)}")
    flags = summary.get("summary_control_flags")
    if flags is not None and not flags.empty:
        flags = flags[flags["model"] == model]
        for metric, rows in flags.groupby("metric", sort=False):
            pairs = ", ".join(f"{r.control} > {r.method}" for r in rows.itertuples())
            lines.append(f"  a control beats a real method on {metric} ({pairs}): it cannot tell good maps from bad")
    return lines


def _lime_lines(model: str, summary: dict[str, pd.DataFrame]) -> list[str]:
    """What LIME's maps cost and how sure their weights are (adaptive LIME stops before the cap)."""
    samples = summary.get("summary_lime_samples")
    if samples is None or samples.empty:
        return []
    lines = []
    for row in samples[samples["model"] == model].itertuples():
        stopping = f"adaptive, {number(row.stopped_early_share)} stopped early" if row.adaptive else "fixed"
        lines.append(
            f"  LIME ({stopping}): {number(row.samples_used_mean)} model evaluations per map of at most "
            f"{int(row.num_samples)}, superpixel weights' std error {number(row.std_error_mean)}"
        )
    return lines


def _is_control(methods: pd.DataFrame, method: str) -> bool:
    return bool(methods.loc[methods["method"] == method, "control"].eq(True).any())


def _concept_lines(model: str, summary: dict[str, pd.DataFrame]) -> list[str]:
    """Per labelling method: the top concepts of each class (the classes with most images first) and
    the ablation check of each image's top concept."""
    lines = []
    matrix = summary["summary_class_concepts"]
    ablation = summary["summary_concept_ablation"]
    matrix, ablation = matrix[matrix["model"] == model], ablation[ablation["model"] == model]
    for (method, layer), rows in matrix.groupby(["method", "layer"], sort=True):
        classes = rows.drop_duplicates("class_name").sort_values(["images", "class_name"], ascending=[False, True])
        shown = classes["class_name"].head(CLASSES_SHOWN).tolist()
        parts = []
        for name in shown:
            top = rows[rows["class_name"] == name].sort_values("rank").head(CLASS_CONCEPTS)
            parts.append(f"{name} <- " + ", ".join(f"{r.concept} {number(r.share_mean)}" for r in top.itertuples()))
        more = f" (+{len(classes) - len(shown)} classes)" if len(classes) > len(shown) else ""
        lines.append(f"  concepts behind each class ({method} labels, {layer}, mean share): {'; '.join(parts)}{more}")
    for method, rows in ablation.groupby("method", sort=True):
        drops = ", ".join(
            f"{r.layer} {number(r.top_drop_mean)} vs {number(r.random_drop_mean)} ({number(r.top_beats_random)})"
            for r in rows.itertuples()
        )
        lines.append(
            f"  zeroing each image's top concept ({method} labels) drops the target probability, vs as many random "
            f"labelled units (share of images where it drops more): {drops}"
        )
    return lines


def _drift_lines(drift: dict[str, dict[str, pd.DataFrame]]) -> list[str]:
    lines = []
    for baseline, tables in drift.items():
        layers = tables["summary_drift_layers"]
        changed = int(layers["changed"].sum()) if not layers.empty else 0
        units = int(layers["units"].sum()) if not layers.empty else 0
        lines.append(f"drift against {baseline}: {changed} of {units} units changed their top concept")
        classes = tables.get("summary_drift_class_concepts")
        if classes is not None and not classes.empty:
            moved = classes.reindex(classes["delta"].abs().sort_values(ascending=False).index).head(DRIFT_METRICS_SHOWN)
            lines += [
                f"  {r.model} class {r.class_name} concept {r.concept} ({r.method}): share {number(r.share_before)} -> "
                f"{number(r.share_after)}"
                for r in moved.itertuples()
            ]
        metrics = tables["summary_drift_metrics"]
        if not metrics.empty:
            moved = metrics.reindex(metrics["delta"].abs().sort_values(ascending=False).index).head(DRIFT_METRICS_SHOWN)
            lines += [
                f"  {r.model} {r.subject} {r.metric}: {number(r.before)} -> {number(r.after)}"
                for r in moved.itertuples()
            ]
    return lines


def _failure_lines(errors: pd.DataFrame | None) -> list[str]:
    """The most frequent reasons among the failed items: (model, stage, error type), one example message each."""
    if errors is None or errors.empty:
        return []
    frame = errors.assign(model=errors["model"].fillna("-"))
    groups = frame.groupby(["model", "stage", "error_type"], sort=False)
    counted = groups.size().sort_values(ascending=False, kind="stable").head(FAILURE_REASONS)
    lines = []
    for (model, stage, error_type), count in counted.items():
        message = str(groups.get_group((model, stage, error_type))["message"].iloc[0])
        message = message if len(message) <= MESSAGE_CHARS else message[: MESSAGE_CHARS - 1] + "…"
        lines.append(f"  {count} x {stage} {error_type} ({model}): {message}")
    return lines


def findings(
    run_id: str,
    summary: dict[str, pd.DataFrame],
    drift: dict[str, dict[str, pd.DataFrame]],
    n_errors: int,
    errors: pd.DataFrame | None = None,
) -> list[str]:
    """The digest's lines (no trailing newlines)."""
    models = sorted(
        set().union(*(set(summary[t]["model"]) for t in ("summary_layers", "summary_methods") if not summary[t].empty))
    )
    lines = [f"findings of run {run_id}"]
    for model in models:
        lines += _model_lines(model, summary)
    lines += _drift_lines(drift)
    if n_errors:
        lines.append(f"{n_errors} item(s) failed: xai-audit query \"select * from errors where run_id = '{run_id}'\"")
        lines += _failure_lines(errors)
    return lines


def run_findings(store: ResultsStore, run_id: str) -> list[str]:
    """:func:`findings` of a stored run."""
    errors = store.read("errors", run_id)
    return findings(run_id, load_summary(store, run_id), read_drift(store, run_id), len(errors), errors)
