"""The report's figures: matplotlib's object API on an Agg canvas (no pyplot, no global backend).

Each function draws one PNG from summary or raw table rows and returns its path; inputs with
nothing to draw return None, so callers never special-case empty runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from skimage.transform import resize

from xai_audit.tasks.results.summary import SANITY_PASS_BELOW, wide_methods

DPI = 80
CATEGORY_COLORS = {
    "color": "#d62728",
    "object": "#1f77b4",
    "texture": "#2ca02c",
    "scene": "#9467bd",
    "part": "#ff7f0e",
    "material": "#8c564b",
    "uncategorized": "#7f7f7f",
}


def _category_color(category: str, others: list[str]) -> str:
    if category in CATEGORY_COLORS:
        return CATEGORY_COLORS[category]
    palette = colormaps["tab20"]
    return to_hex(palette(others.index(category) % 20)) if category in others else "#7f7f7f"


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=DPI)
    return path


def layer_concepts(concepts: pd.DataFrame, title: str, path: Path, top_n: int = 8) -> Path | None:
    """One panel per layer: its top concepts by unit count, coloured by category (one model and method)."""
    if concepts.empty:
        return None
    layers = list(dict.fromkeys(concepts["layer"]))
    categories = sorted(set(concepts["category"]))
    figure = Figure(figsize=(3.2 * len(layers), 3.4), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(layers), squeeze=False)[0])
    for ax, layer in zip(axes, layers):
        rows = concepts[(concepts["layer"] == layer) & (concepts["rank"] <= top_n)].sort_values("rank", ascending=False)
        ax.barh(rows["concept"], rows["units"], color=[_category_color(c, categories) for c in rows["category"]])
        ax.set_title(layer, fontsize=10)
        ax.set_xlabel("units")
        ax.tick_params(labelsize=8)
    handles = [Patch(color=_category_color(c, categories), label=c) for c in categories]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8)
    figure.suptitle(title, fontsize=11)
    return _save(figure, path)


def score_distributions(neurons: pd.DataFrame, path: Path) -> Path | None:
    """Histogram of unit scores per layer, one panel per (model, method)."""
    if neurons.empty:
        return None
    panels = list(neurons.groupby(["model", "method"], sort=True))
    figure = Figure(figsize=(4.2 * len(panels), 3.2), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, ((model, method), rows) in zip(axes, panels):
        scores = rows["score"].dropna().astype(float)
        bins = np.linspace(scores.min(), scores.max() + 1e-9, 30) if len(scores) else 10
        for layer, layer_rows in rows.groupby("layer", sort=False):
            ax.hist(layer_rows["score"].dropna().astype(float), bins=bins, histtype="step", label=layer)
        ax.set_title(f"{model} · {method}", fontsize=10)
        ax.set_xlabel("IoU" if method == "netdissect" else "similarity")
        ax.set_ylabel("units")
        ax.legend(fontsize=7)
    return _save(figure, path)


def category_shares(categories: pd.DataFrame, models: Sequence[str], method: str, path: Path) -> Path | None:
    """Stacked share of counted units per category, layer by layer, models side by side."""
    rows = categories[(categories["method"] == method) & categories["model"].isin(models)]
    if rows.empty:
        return None
    names = sorted(set(rows["category"]))
    figure = Figure(figsize=(4.0 * len(models), 3.4), layout="constrained")
    axes = figure.subplots(1, len(models), squeeze=False, sharey=True)[0]
    for ax, model in zip(axes, models):
        table = (
            rows[rows["model"] == model]
            .pivot_table(index="layer", columns="category", values="share", aggfunc="sum", sort=False)
            .fillna(0)
        )
        bottom = np.zeros(len(table))
        for category in names:
            values = table[category].to_numpy() if category in table else np.zeros(len(table))
            ax.bar(
                table.index.astype(str), values, bottom=bottom, color=_category_color(category, names), label=category
            )
            bottom += values
        ax.set_title(model, fontsize=10)
        ax.set_ylabel("share of units")
        ax.tick_params(labelsize=8)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.suptitle(f"concept categories per layer ({method})", fontsize=11)
    return _save(figure, path)


def iou_distributions(agreement: pd.DataFrame, path: Path) -> Path | None:
    """Box plots of IoU per method pair, one panel per model."""
    if agreement.empty:
        return None
    models = sorted(set(agreement["model"]))
    figure = Figure(
        figsize=(max(4.0, 1.1 * agreement.groupby(["method_a", "method_b"]).ngroups + 1.5), 3.0 * len(models)),
        layout="constrained",
    )
    axes = figure.subplots(len(models), 1, squeeze=False)[:, 0]
    for ax, model in zip(axes, models):
        rows = agreement[agreement["model"] == model]
        groups = list(rows.groupby(["method_a", "method_b"]))
        ax.boxplot([g["iou"].dropna().astype(float).to_numpy() for _, g in groups], showmeans=True)
        ax.set_xticks(range(1, len(groups) + 1), [f"{a}\nvs {b}" for (a, b), _ in groups], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("IoU")
        ax.set_title(f"{model}: agreement between methods", fontsize=10)
    return _save(figure, path)


def leaderboard(methods: pd.DataFrame, path: Path) -> Path | None:
    """Bars per method, one panel per leaderboard value the run has (one row per model).

    The values and their arrows are the registry's (:func:`xai_audit.tasks.results.summary.wide_methods`):
    every registered value with a ``summary_methods`` column, the derived ones, then each key of
    the ``scores`` map (no arrow for a key no registered metric declares).
    """
    wide, columns = wide_methods(methods)
    metrics = [
        (column, f"{score.label} {score.arrow}" if score else column)
        for column, score in columns
        if wide[column].notna().any()
    ]
    if not metrics:
        return None
    models = sorted(set(wide["model"]))
    figure = Figure(figsize=(3.2 * len(metrics), 2.8 * len(models)), layout="constrained")
    axes = figure.subplots(len(models), len(metrics), squeeze=False)
    for row, model in enumerate(models):
        rows = wide[wide["model"] == model]
        for col, (column, label) in enumerate(metrics):
            ax = axes[row, col]
            controls = rows["control"] if "control" in rows else [None] * len(rows)
            colors = ["#999999" if control is True else "#4c72b0" for control in controls]
            ax.bar(rows["method"], rows[column].astype(float).fillna(0), color=colors)
            ax.set_title(f"{model}: {label}", fontsize=9)
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    return _save(figure, path)


def randomisation_curves(curves: pd.DataFrame, controls: set[str], title: str, path: Path) -> Path | None:
    """One line per method: mean Spearman (left) and SSIM (right) of each step's maps with the trained
    model's, for one model and test; controls dashed, the pass threshold dotted."""
    if curves.empty:
        return None
    steps = curves.drop_duplicates("step").sort_values("step")
    labels = ["trained" if step == 0 else str(layer) for step, layer in zip(steps["step"], steps["layer"])]
    figure = Figure(figsize=(11, 3.6), layout="constrained")
    axes = figure.subplots(1, 2)
    for ax, column, name in ((axes[0], "spearman_mean", "Spearman"), (axes[1], "ssim_mean", "SSIM")):
        for method, rows in curves.groupby("method", sort=True):
            rows = rows.sort_values("step")
            style = "--" if method in controls else "-"
            ax.plot(rows["step"], rows[column], marker="o", markersize=3, linestyle=style, label=method)
        if column == "spearman_mean":
            ax.axhline(SANITY_PASS_BELOW, color="#555555", linestyle=":", linewidth=1)
        ax.set_xticks(list(steps["step"]), labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylim(-0.3, 1.05)
        ax.set_ylabel(f"{name} with the trained model's map")
    axes[1].legend(fontsize=7, loc="lower left")
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def overlay(image: np.ndarray, saliency_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``saliency_map`` in the jet colour map blended over an RGB uint8 image of the same size."""
    heat = colormaps["jet"](np.clip(saliency_map, 0, 1))[..., :3]
    return (1 - alpha) * (image.astype(np.float32) / 255) + alpha * heat


def comparison_grid(
    image: np.ndarray | None,
    maps: Mapping[str, np.ndarray],
    title: str,
    path: Path,
    subtitles: Mapping[str, str] | None = None,
) -> Path:
    """The image and each method's map over it (or alone when the image is unavailable)."""
    subtitles = subtitles or {}
    panels = (["image"] if image is not None else []) + list(maps)
    # a fixed layout: constrained layout would double the cost of the report's most numerous figure
    figure = Figure(figsize=(2.1 * len(panels), 2.75))
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.76, wspace=0.06)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, name in zip(axes, panels):
        if name == "image":
            ax.imshow(image)
        elif image is not None:
            ax.imshow(overlay(image, maps[name]))
        else:
            ax.imshow(maps[name], cmap="jet", vmin=0, vmax=1)
        ax.set_title(f"{name}\n{subtitles.get(name, '')}".strip(), fontsize=8)
        ax.set_axis_off()
    figure.suptitle(title, fontsize=8)
    return _save(figure, path)


DRIFT_METRICS = ("agreement_iou_mean", "pointing_accuracy", "deletion_auc_mean", "insertion_auc_mean", "iou_mean")


def drift_summary(layers: pd.DataFrame, metrics: pd.DataFrame, title: str, path: Path) -> Path | None:
    """Share of units that changed their concept per layer, and the metric deltas per method."""
    if not metrics.empty:
        metrics = metrics[metrics["metric"].isin(DRIFT_METRICS)].dropna(subset=["delta"])
    panels = [name for name, frame in (("layers", layers), ("metrics", metrics)) if not frame.empty]
    if not panels:
        return None
    height = max(3.0, 0.9 + 0.2 * max(len(layers), len(metrics)))
    figure = Figure(figsize=(5.5 * len(panels), height), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        if panel == "layers":
            labels = [f"{m}·{name}·{k}" for m, name, k in zip(layers["model"], layers["layer"], layers["method"])]
            ax.barh(labels, layers["changed_share"].astype(float), color="#c44e52")
            ax.set_xlim(0, 1)
            ax.set_xlabel("share of units whose top concept changed")
            ax.tick_params(labelsize=7)
        else:
            labels = [f"{m}·{s}·{k}" for m, s, k in zip(metrics["model"], metrics["subject"], metrics["metric"])]
            values = metrics["delta"].astype(float)
            ax.barh(labels, values, color="#4c72b0")
            ax.axvline(0, color="black", linewidth=0.8)
            ax.set_xlabel("after - before")
            ax.tick_params(labelsize=7)
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def class_concept_matrix(matrix: pd.DataFrame, title: str, path: Path, top_n: int = 12) -> Path | None:
    """The class x concept heat map of one (model, labelling method, layer): mean share of each
    class's target logit carried by each concept's units (the ``top_n`` concepts by largest share)."""
    if matrix.empty:
        return None
    strongest = matrix.groupby("concept")["share_mean"].max().sort_values(ascending=False)
    concepts = sorted(strongest.index[:top_n])
    table = matrix.pivot_table(index="class_name", columns="concept", values="share_mean", aggfunc="first")
    table = table.reindex(columns=concepts).fillna(0.0).sort_index()
    figure = Figure(
        figsize=(max(4.0, 0.5 * len(concepts) + 2.5), max(2.5, 0.32 * len(table) + 1.6)), layout="constrained"
    )
    ax = figure.subplots()
    limit = max(float(np.abs(table.to_numpy()).max()), 1e-6)
    image = ax.imshow(table.to_numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(concepts)), concepts, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(table)), table.index, fontsize=8)
    ax.set_xlabel("concept")
    ax.set_ylabel("class")
    figure.colorbar(image, ax=ax, label="mean share of the class logit")
    ax.set_title(title, fontsize=9)
    return _save(figure, path)


def upsampled(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A layer-grid heatmap bilinearly resized to ``size`` (height, width), its positive part scaled to [0, 1]."""
    resized = resize(heatmap.astype(np.float64), size, order=1, mode="edge", anti_aliasing=False)
    positive = np.clip(resized, 0, None)
    return positive / positive.max() if positive.max() > 0 else positive


def concept_panel(
    image: np.ndarray | None,
    attributions: pd.DataFrame,
    heatmaps: Mapping[tuple[str, str], np.ndarray],
    title: str,
    path: Path,
    shown: int = 3,
) -> Path | None:
    """Per labelling method: a bar chart of the image's top concepts' shares, then the heatmaps of
    the first ``shown`` concepts over the image (``heatmaps``: (method, concept) -> map in [0, 1])."""
    if attributions.empty:
        return None
    methods = sorted(set(attributions["method"]))
    figure = Figure(figsize=(2.3 * (shown + 1.6), 2.5 * len(methods)))
    figure.subplots_adjust(left=0.1, right=0.99, bottom=0.08, top=0.86, wspace=0.25, hspace=0.5)
    grid = figure.add_gridspec(len(methods), shown + 2)
    for row, method in enumerate(methods):
        rows = attributions[attributions["method"] == method].sort_values("rank")
        bars = figure.add_subplot(grid[row, :2])
        categories = sorted(set(rows["category"].fillna("uncategorized")))
        bars.barh(
            rows["concept"][::-1],
            rows["share"][::-1],
            color=[_category_color(c, categories) for c in rows["category"].fillna("uncategorized")[::-1]],
        )
        bars.set_title(f"{method}: share of the target logit", fontsize=8)
        bars.tick_params(labelsize=7)
        for column, concept in enumerate(rows["concept"].head(shown), start=2):
            ax = figure.add_subplot(grid[row, column])
            heat = heatmaps[(method, concept)]
            ax.imshow(overlay(image, heat) if image is not None else heat, cmap=None if image is not None else "jet")
            ax.set_title(concept, fontsize=8)
            ax.set_axis_off()
    figure.suptitle(title, fontsize=8)
    return _save(figure, path)
