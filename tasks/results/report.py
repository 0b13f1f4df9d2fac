"""The static HTML report of one run: ``<results>/reports/<run_id>/index.html`` with PNG figures.

Plain HTML and PNGs with relative links, no scripts and nothing fetched from the network, so the
folder opens from the file system and can be copied anywhere. It reads the run's summary tables
(computed in memory when the run was never summarized), its drift tables, and the few raw rows
that figures need (unit scores, IoU values, the maps of the images shown). Per-image pages are
bounded (the first images plus the best and worst by agreement of each model), so a run of any
size gives a report of the same size.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import socket
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import torchvision.transforms.functional as TF

from xai_audit.storage.maps import decode_heatmap, decode_map
from xai_audit.storage.parquet import ResultsStore, safe_name
from xai_audit.storage.runs import RunRecord
from xai_audit.storage.schemas import SUMMARY_TABLES
from xai_audit.tasks.core.config import ConfigErrors, ModelConfig, parse_config
from xai_audit.tasks.core.errors import ItemError
from xai_audit.tasks.data.image_sets import iter_image_set
from xai_audit.tasks.data.images import load_rgb
from xai_audit.tasks.results import figures
from xai_audit.tasks.results.drift import read_drift
from xai_audit.tasks.results.findings import findings, flag, method_marks
from xai_audit.tasks.results.summary import (
    SANITY_PASS_BELOW,
    class_names,
    load_summary,
    raw_counts,
    require_run,
    wide_methods,
)

REPORTS = "reports"
FIRST_IMAGES = 8  # per-image pages: the first images of each model ...
EXTREME_IMAGES = 3  # ... and its best and worst images by mean IoU between methods
TABLE_ROWS = 40
ATTRIBUTION_COLUMNS = [
    "model",
    "image_id",
    "method",
    "layer",
    "concept",
    "category",
    "rank",
    "units",
    "contribution",
    "share",
    "heatmap",
    "heatmap_height",
    "heatmap_width",
    "ablation_drop",
    "random_drop",
]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1200px; color: #222; padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2rem; margin-top: 2rem; }
h3 { margin-top: 1.4rem; } nav a { margin-right: 1rem; }
table.t { border-collapse: collapse; font-size: .85rem; margin: .5rem 0 1rem; }
table.t th, table.t td { border: 1px solid #ddd; padding: .2rem .5rem; text-align: right; }
table.t th { background: #f3f3f3; } table.t td:first-child, table.t th:first-child { text-align: left; }
img.fig { max-width: 100%; border: 1px solid #eee; margin: .3rem 0; display: block; }
.muted { color: #777; } .scroll { overflow-x: auto; } .grid a { display: block; margin-bottom: .8rem; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: .2rem 1rem; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; }
h1 code, dd, pre.findings { overflow-wrap: anywhere; }
pre.findings { white-space: pre-wrap; background: #f6f6f6; padding: .6rem .8rem; border-radius: 4px; font-size: .9rem; }
"""


def _integer_columns() -> frozenset[str]:
    """Column names that every summary schema declaring them types as integers."""
    kinds: dict[str, set[bool]] = {}
    for schema in SUMMARY_TABLES.values():
        for column in schema:
            kinds.setdefault(column.name, set()).add(pa.types.is_integer(column.type))
    return frozenset(name for name, integer in kinds.items() if integer == {True})


# Integer columns with nulls (e.g. netdissect-only counts) come back from Parquet as floats.
INTEGER_COLUMNS = _integer_columns()


def report_folder(store: ResultsStore, run_id: str) -> str:
    """Where the report of ``run_id`` lives under the results root."""
    return f"{store.base}/{REPORTS}/{safe_name(run_id)}"


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _table(frame: pd.DataFrame, limit: int = TABLE_ROWS) -> str:
    """A frame as an HTML table (escaped), at most ``limit`` rows with a note when cut."""
    if frame.empty:
        return '<p class="muted">(no rows)</p>'
    shown = frame.head(limit).copy()
    for name in shown.columns.intersection(list(INTEGER_COLUMNS)):
        values = shown[name]
        if pd.api.types.is_float_dtype(values) and (values.dropna() % 1 == 0).all():
            shown[name] = values.map(lambda value: "–" if pd.isna(value) else str(int(value)))
    body = shown.to_html(
        index=False, classes="t", border=0, na_rep="–", escape=True, float_format=lambda value: f"{value:.3f}"
    )
    more = (
        f'<p class="muted">{len(frame) - limit} more row(s): see the Parquet table.</p>' if len(frame) > limit else ""
    )
    return f'<div class="scroll">{body}</div>{more}'


def _img(path: Path | None, base: Path, alt: str) -> str:
    if path is None:
        return ""
    return f'<img class="fig" src="{_esc(path.relative_to(base).as_posix())}" alt="{_esc(alt)}">'


def _page(title: str, body: str, css_href: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_esc(title)}</title>'
        f'<link rel="stylesheet" href="{css_href}"></head>\n<body>\n{body}\n</body></html>\n'
    )


def view_geometry(model_config: ModelConfig, map_side: int) -> tuple[int, int]:
    """(resize, crop) that turn an image into what the model saw, scaled to ``map_side`` pixels."""
    # model sources import torch and torchvision; the report needs them only to draw model views
    from xai_audit.tasks.data.sources.registry import model_source

    geometry = model_source(model_config.source).geometry(model_config)
    resize, crop = geometry if geometry is not None else (map_side, map_side)
    if crop != map_side:
        resize, crop = round(resize * map_side / crop), map_side
    return resize, crop


def model_view(path: Path, resize: int, crop: int) -> np.ndarray:
    """The image at ``path`` resized and centre-cropped like the model's input, as RGB uint8."""
    image = TF.center_crop(TF.resize(load_rgb(path), resize), [crop, crop])
    return np.asarray(image)


def image_paths(config, wanted: set[str]) -> dict[str, Path]:
    """Where the ``wanted`` image ids of the run's image set are (missing ones are left out)."""
    found: dict[str, Path] = {}
    if not wanted or config is None:
        return found
    try:
        for item in iter_image_set(config):
            if not isinstance(item, ItemError) and item.image_id in wanted:
                found[item.image_id] = Path(item.path)
                if len(found) == len(wanted):
                    break
    except Exception:  # noqa: BLE001 - a moved image set only costs the report its pictures
        pass
    return found


def _run_config(record: RunRecord):
    try:
        return parse_config(json.loads(record.config_json))
    except (ConfigErrors, ValueError):
        return None


def leaderboard_table(methods: pd.DataFrame, flags: pd.DataFrame | None = None) -> pd.DataFrame:
    """``summary_methods`` as the report shows it: each ``scores`` key a column of its own, and
    each metric column named with the arrow of the direction its metric declares (↑ higher is
    better, ↓ lower; none for a key no registered metric declares). Controls and methods that
    fail the sanity check are marked after their name, and a metric on which a control beats a
    real method (``flags``: ``summary_control_flags``) gets "⚠ control wins" after its arrow."""
    wide, metrics = wide_methods(methods)
    beaten = set(flags["metric"]) if flags is not None and not flags.empty else set()
    wide = wide.assign(method=[f"{row['method']}{method_marks(row)}" for row in wide.to_dict("records")])
    return wide.rename(
        columns={
            column: f"{column} {score.arrow}{' ⚠ control wins' if column in beaten else ''}"
            for column, score in metrics
            if score
        }
    )


def _of_image(frame: pd.DataFrame, model: str, image_id: str) -> pd.DataFrame:
    return frame[(frame["model"] == model) & (frame["image_id"] == image_id)]


def final_status(record: RunRecord, n_errors: int) -> tuple[str, object]:
    """The run's status and finish time as the report should show them.

    The summary stage writes the report as the run's last step, while its ``runs`` row still says
    ``running``; that run's own process therefore shows the status the flow is about to record.
    A report of a running run written from any other process keeps ``running``.
    """
    if record.status != "running" or record.pid != os.getpid() or record.hostname != socket.gethostname():
        return record.status, record.finished_at
    return ("partial" if n_errors else "completed"), pd.Timestamp.now(tz="UTC").floor("s")


@dataclass
class _ImagePage:
    model: str
    image_id: str
    href: str
    figure: Path | None = None
    tags: list[str] = field(default_factory=list)
    concept_figure: Path | None = None
    concepts: pd.DataFrame = field(default_factory=pd.DataFrame)
    target_figures: list[Path] = field(default_factory=list)
    """The maps of the image's further targets (explain.target topk or class names), one figure per class."""
    lime: pd.DataFrame = field(default_factory=pd.DataFrame)
    """The image's ``lime_uncertainty`` rows: samples each LIME map used and its mean standard error."""


class _Report:
    """Builds the report of one run into a local folder."""

    def __init__(self, store: ResultsStore, run_id: str, out: Path) -> None:
        self.store, self.run_id, self.out = store, run_id, out
        self.figures = out / "figures"
        self.record = RunRecord.load(store, run_id)
        self.config = _run_config(self.record)
        self.summary = load_summary(store, run_id)

    def raw(self, table: str, columns: list[str], where=None) -> pd.DataFrame:
        return self.store.dataset(table, self.run_id).to_table(columns=columns, filter=where).to_pandas()

    def build(self) -> Path:
        (self.out / "style.css").write_text(STYLE)
        pages = self.image_pages()
        sections = [
            self.header(),
            self.drift(),
            self.neurons(),
            self.explanations(pages),
            self.concepts(),
            self.image_index(pages),
        ]
        nav = (
            '<nav><a href="#drift">drift</a><a href="#neurons">neurons</a><a href="#explanations">explanations</a>'
            '<a href="#concepts">concepts</a><a href="#images">images</a></nav>'
        )
        index = self.out / "index.html"
        index.write_text(_page(f"xai-audit run {self.run_id}", nav + "\n".join(sections), "style.css"))
        return index

    # ----------------------------------------------------------------------------- sections
    def header(self) -> str:
        record, counts = self.record, raw_counts(self.store, self.run_id)
        status, finished = final_status(record, counts.get("errors", 0))
        models = ", ".join(model.name for model in self.config.models) if self.config else "?"
        meta = {
            "run": record.run_id,
            "config": record.config_name,
            "status": status,
            "started": record.started_at,
            "finished": finished or "–",
            "device": record.device,
            "precision": record.precision or "–",
            "models": models,
            "failed items": counts.get("errors", 0),
        }
        rows = "".join(f"<dt>{_esc(key)}</dt><dd>{_esc(value)}</dd>" for key, value in meta.items())
        table = pd.DataFrame({"table": list(counts), "rows": list(counts.values())})
        digest = findings(
            self.run_id,
            self.summary,
            read_drift(self.store, self.run_id),
            counts.get("errors", 0),
            self.store.read("errors", self.run_id),
        )
        return (
            f'<h1>xai-audit run <code>{_esc(self.run_id)}</code></h1><dl class="meta">{rows}</dl>'
            f'<h2 id="findings">Findings</h2><pre class="findings">{_esc(chr(10).join(digest[1:]))}</pre>'
            + _table(table)
        )

    def drift(self) -> str:
        parts = ['<h2 id="drift">Drift</h2>']
        baselines = read_drift(self.store, self.run_id)
        if not baselines:
            parts.append(
                '<p class="muted">No earlier completed run of this config to compare with '
                "(<code>xai-audit diff RUN_A RUN_B</code> compares any two runs).</p>"
            )
        for baseline, tables in baselines.items():
            figure = figures.drift_summary(
                tables["summary_drift_layers"],
                tables["summary_drift_metrics"],
                f"{self.run_id} vs {baseline}",
                self.figures / f"drift-{safe_name(baseline)}.png",
            )
            parts += [
                f"<h3>Against <code>{_esc(baseline)}</code></h3>",
                _img(figure, self.out, f"drift against {baseline}"),
                "<p>Units whose top concept changed, per layer and method:</p>",
                _table(tables["summary_drift_layers"].drop(columns="baseline_run_id")),
                "<p>Explanation metrics before and after:</p>",
                _table(
                    tables["summary_drift_metrics"]
                    .drop(columns="baseline_run_id")
                    .dropna(subset=["delta"])
                    .reindex(columns=["model", "subject", "metric", "before", "after", "delta"])
                ),
                "<p>Largest concept-histogram changes:</p>",
                _table(
                    tables["summary_drift_concepts"]
                    .drop(columns="baseline_run_id")
                    .sort_values("delta", key=abs, ascending=False),
                    limit=20,
                ),
            ]
        return "\n".join(parts)

    def neurons(self) -> str:
        summary = self.summary
        parts = ['<h2 id="neurons">Neuron labelling</h2>']
        layers = summary["summary_layers"]
        if layers.empty:
            return parts[0] + '<p class="muted">This run labelled no units (dissect disabled or failed).</p>'
        parts += ["<h3>Units per layer</h3>", _table(layers)]
        concepts = summary["summary_concepts"]
        for (model, method), rows in concepts.groupby(["model", "method"], sort=True):
            figure = figures.layer_concepts(
                rows,
                f"{model}: top concepts per layer ({method})",
                self.figures / f"concepts-{safe_name(model)}-{method}.png",
            )
            parts += [
                f"<h3>{_esc(model)}: concepts per layer ({_esc(method)})</h3>",
                _img(figure, self.out, f"{model} {method} layer concepts"),
            ]
        scores = self.raw("neurons", ["model", "layer", "method", "score"])
        parts += [
            "<h3>Score distributions</h3>",
            _img(figures.score_distributions(scores, self.figures / "scores.png"), self.out, "unit scores"),
        ]
        categories = summary["summary_categories"]
        models = sorted(set(categories["model"]))
        for method in sorted(set(categories["method"])):
            figure = figures.category_shares(categories, models, method, self.figures / f"categories-{method}.png")
            parts += [
                f"<h3>Concept categories per layer ({_esc(method)}: {' vs '.join(map(_esc, models))})</h3>",
                _img(figure, self.out, f"category shares {method}"),
            ]
        checks = summary.get("summary_label_checks")
        if checks is not None and not checks.empty:
            parts += [
                "<h3>Label self-test: the final layer</h3>",
                "<p>CLIP-Dissect on each classifier's output units, whose true concepts are their class names "
                "(the CLIP-Dissect paper's own evaluation): accuracy is the share of units labelled with their own "
                "class, text similarity the mean CLIP text cosine between label and class name.</p>",
                _table(checks),
            ]
        agreement = summary["summary_label_agreement"]
        parts += [
            "<h3>CLIP-Dissect vs Network Dissection</h3>",
            _table(agreement) if not agreement.empty else '<p class="muted">Needs both labelling methods.</p>',
        ]
        shared = summary["summary_concept_models"]
        parts.append("<h3>Concepts unique to a model and shared</h3>")
        parts.append(_table(shared.sort_values(["scope", "units"], ascending=[False, False]), limit=30))
        return "\n".join(parts)

    def explanations(self, pages: dict[tuple[str, str], _ImagePage]) -> str:
        summary = self.summary
        parts = ['<h2 id="explanations">Explanations</h2>']
        pairs, methods = summary["summary_pairs"], summary["summary_methods"]
        if methods.empty:
            return parts[0] + '<p class="muted">This run explained no images (explain disabled or failed).</p>'
        agreement = self.raw("agreement", ["model", "method_a", "method_b", "iou"])
        parts += [
            "<h3>Agreement between methods</h3>",
            _table(pairs),
            _img(figures.iou_distributions(agreement, self.figures / "iou.png"), self.out, "IoU per method pair"),
            "<h3>Leaderboards: localization and faithfulness</h3>",
            _table(leaderboard_table(methods, summary.get("summary_control_flags"))),
            _img(figures.leaderboard(methods, self.figures / "leaderboard.png"), self.out, "method leaderboard"),
            self.sanity(),
        ]
        images = summary["summary_images"]
        for model, rows in images.groupby("model", sort=True):
            for label, chosen in (
                ("best", rows.nsmallest(EXTREME_IMAGES, "rank")),
                ("worst", rows.nlargest(EXTREME_IMAGES, "rank")),
            ):
                links = [
                    f'<a href="{_esc(pages[(model, image_id)].href)}">'
                    f"{_img(pages[(model, image_id)].figure, self.out, image_id)}</a>"
                    for image_id in chosen["image_id"]
                    if (model, image_id) in pages
                ]
                parts += [
                    f"<h3>{_esc(model)}: {label} images by agreement</h3>",
                    f'<div class="grid">{"".join(links)}</div>',
                ]
        classes = summary["summary_classes"]
        if not classes.empty:
            parts += ["<h3>Classes by agreement (best first)</h3>", _table(classes)]
        samples = summary.get("summary_lime_samples")
        if samples is not None and not samples.empty:
            parts += ["<h3>LIME: model evaluations and uncertainty</h3>", _table(samples)]
        lime = summary["summary_lime_params"]
        if not lime.empty:
            parts += [
                "<h3>LIME parameter search</h3>",
                "<p>Parameter sets over all images (rank 1 is best overall):</p>",
                _table(lime),
                "<p>Best parameters per image:</p>",
                _table(summary["summary_lime_best"]),
            ]
        return "\n".join(parts)

    def sanity(self) -> str:
        """The sanity checks: each method's randomisation curve, the verdicts, and the metrics a control beats."""
        parts = ['<h3 id="sanity">Sanity checks: do the maps depend on the model?</h3>']
        curves, methods = self.summary.get("summary_sanity"), self.summary["summary_methods"]
        flags = self.summary.get("summary_control_flags")
        if curves is None or curves.empty:
            parts.append(
                '<p class="muted">No sanity checks in this run (<code>explain.sanity.enabled</code> is off).</p>'
            )
        else:
            parts.append(
                "<p>Each step randomises one more block of the model, from the output down (cascading; smprt: from "
                "the input up, maps averaged over noisy inputs); a curve is the mean similarity of that step's maps "
                f"with the trained model's. A method passes when its last cascading step's Spearman is below "
                f"{SANITY_PASS_BELOW}; a map that stays the same explains the image, not the model.</p>"
            )
            controls = {row["method"] for row in methods.to_dict("records") if flag(row.get("control"))}
            for (model, test), rows in curves[curves["test"].isin(["cascading", "smprt"])].groupby(
                ["model", "test"], sort=True
            ):
                figure = figures.randomisation_curves(
                    rows,
                    controls,
                    f"{model}: {test} randomisation",
                    self.figures / f"sanity-{safe_name(model)}-{test}.png",
                )
                parts += [f"<h4>{_esc(model)}: {_esc(test)}</h4>", _img(figure, self.out, f"{model} {test} curve")]
            verdicts = [
                "model",
                "method",
                "control",
                "sanity_spearman",
                "sanity_ssim",
                "sanity_passed",
                "smprt_spearman",
                "emprt",
                "random_logit_ssim",
            ]
            parts.append(_table(methods.reindex(columns=verdicts)))
        if flags is not None and not flags.empty:
            parts += [
                "<p><strong>A control beats a real method</strong> on these metrics: on this data they cannot tell "
                "good maps from bad.</p>",
                _table(flags),
            ]
        return "\n".join(parts)

    def concepts(self) -> str:
        """The class x concept matrices and the ablation check of the concept attributions."""
        parts = ['<h2 id="concepts">Concepts behind the decisions</h2>']
        matrix, ablation = self.summary["summary_class_concepts"], self.summary["summary_concept_ablation"]
        if matrix.empty:
            return parts[0] + (
                '<p class="muted">No concept attributions: this run labelled no layer (the dissect stage was off or '
                "failed) or <code>explain.concepts.enabled</code> is off.</p>"
            )
        parts.append(
            "<p>Each image's target logit split over a labelled layer's units by gradient × activation, the units "
            "grouped by their label; a cell is the mean share of the class's logit carried by the concept's units "
            "(negative: the units argue against the class).</p>"
        )
        for (model, method, layer), rows in matrix.groupby(["model", "method", "layer"], sort=True):
            figure = figures.class_concept_matrix(
                rows,
                f"{model} · {layer} · {method} labels",
                self.figures / f"class-concepts-{safe_name(model)}-{method}-{safe_name(layer)}.png",
            )
            parts += [
                f"<h3>{_esc(model)}: concepts per class ({_esc(method)} labels, {_esc(layer)})</h3>",
                _img(figure, self.out, f"{model} {method} class x concept matrix"),
            ]
        if not ablation.empty:
            parts += [
                "<h3>Do the attributed concepts matter? (ablation)</h3>",
                "<p>Zeroing each image's top concept's units against zeroing as many random labelled units: the "
                "mean drop of the target probability.</p>",
                _table(ablation),
            ]
        return "\n".join(parts)

    def image_index(self, pages: dict[tuple[str, str], _ImagePage]) -> str:
        if not pages:
            return '<h2 id="images">Images</h2><p class="muted">No explained images.</p>'
        items = "".join(
            f'<li><a href="{_esc(page.href)}">{_esc(page.model)} · {_esc(page.image_id)}</a>'
            f"{' <span class=muted>(' + ', '.join(page.tags) + ')</span>' if page.tags else ''}</li>"
            for page in pages.values()
        )
        return (
            f'<h2 id="images">Images</h2><p class="muted">The first {FIRST_IMAGES} images of each model and its '
            f"{EXTREME_IMAGES} best and worst.</p><ul>{items}</ul>"
        )

    # ----------------------------------------------------------------------------- image pages
    def chosen_images(self) -> dict[tuple[str, str], list[str]]:
        """(model, image id) → why it gets a page, for the bounded set of per-image pages."""
        predictions = self.raw("predictions", ["model", "image_id"]).sort_values(["model", "image_id"])
        chosen: dict[tuple[str, str], list[str]] = {}
        for model, rows in predictions.groupby("model", sort=True):
            for image_id in rows["image_id"].head(FIRST_IMAGES):
                chosen.setdefault((model, image_id), [])
        images = self.summary["summary_images"]
        for model, rows in images.groupby("model", sort=True):
            for tag, picked in (
                ("best", rows.nsmallest(EXTREME_IMAGES, "rank")),
                ("worst", rows.nlargest(EXTREME_IMAGES, "rank")),
            ):
                for image_id, rank in zip(picked["image_id"], picked["rank"]):
                    chosen.setdefault((model, image_id), []).append(f"{tag}: rank {rank} of {len(rows)}")
        return chosen

    def image_pages(self) -> dict[tuple[str, str], _ImagePage]:
        chosen = self.chosen_images()
        if not chosen:
            return {}
        ids = sorted({image_id for _, image_id in chosen})
        where = ds.field("image_id").isin(ids)
        saliency = self.raw("saliency", ["model", "image_id", "method", "target", "height", "width", "map"], where)
        predictions = self.raw("predictions", ["model", "image_id", "label_name", "prob", "topk", "true_label"], where)
        agreement = self.raw(
            "agreement",
            ["model", "image_id", "target", "method_a", "method_b", "iou", "spearman", "com_distance"],
            where,
        )
        localization = self.raw(
            "localization", ["model", "image_id", "target", "method", "pointing_hit", "iou_gt", "energy_in_gt"], where
        )
        faithfulness = self.raw(
            "faithfulness", ["model", "image_id", "target", "method", "deletion_auc", "insertion_auc"], where
        )
        attribution = self.raw("concept_attribution", ATTRIBUTION_COLUMNS, where)
        uncertainty = self.raw("lime_uncertainty", LIME_UNCERTAINTY_COLUMNS, where)
        paths = image_paths(self.config, set(ids))
        model_configs = {model.name: model for model in self.config.models} if self.config else {}
        summary_images = self.summary["summary_images"].set_index(["model", "image_id", "target"])
        names = class_names(predictions)
        pages = {}
        for number, ((model, image_id), tags) in enumerate(sorted(chosen.items())):
            page = _ImagePage(model, image_id, f"images/{safe_name(model)}-{number:04d}.html", tags=tags)
            image_maps = _of_image(saliency, model, image_id)
            page.lime = _of_image(uncertainty, model, image_id)
            side = int(image_maps["height"].iloc[0]) if not image_maps.empty else 0
            picture = None
            if side and image_id in paths and model in model_configs:
                try:
                    picture = model_view(paths[image_id], *view_geometry(model_configs[model], side))
                except Exception:  # noqa: BLE001 - an unreadable image still gets its maps drawn
                    picture = None
            for rank, target in enumerate(dict.fromkeys(image_maps["target"])):
                figure = self.target_figure(
                    model,
                    image_id,
                    {
                        row["method"]: decode_map(row)
                        for row in image_maps[image_maps["target"] == target].to_dict("records")
                    }
                    | lime_uncertainty_panel(page.lime, target),
                    _of_image(agreement, model, image_id).query("target == @target"),
                    summary_images.loc[(model, image_id, target)]
                    if (model, image_id, target) in summary_images.index
                    else None,
                    names.get((model, int(target)), str(target)),
                    picture,
                    self.figures / "images" / f"{safe_name(model)}-{number:04d}{f'-target{rank}' if rank else ''}.png",
                )
                if rank:
                    page.target_figures.append(figure)
                else:
                    page.figure = figure
            if not image_maps.empty:
                page.concepts = _of_image(attribution, model, image_id)
                heatmaps = {
                    (row["method"], row["concept"]): figures.upsampled(decode_heatmap(row), (side, side))
                    for row in page.concepts.to_dict("records")
                }
                page.concept_figure = figures.concept_panel(
                    picture,
                    page.concepts,
                    heatmaps,
                    f"{model} · {image_id}: concepts behind the target class",
                    self.figures / "images" / f"{safe_name(model)}-{number:04d}-concepts.png",
                )
            self.write_image_page(
                page,
                _of_image(predictions, model, image_id),
                _of_image(agreement, model, image_id),
                _of_image(localization, model, image_id),
                _of_image(faithfulness, model, image_id),
            )
            pages[(model, image_id)] = page
        return pages

    def method_notes(self, model: str) -> str:
        """A line naming the model's controls and the methods that fail the sanity check (empty when none)."""
        methods = self.summary["summary_methods"]
        methods = methods[methods["model"] == model]
        notes = [f"{row['method']}{method_marks(row)}" for row in methods.to_dict("records") if method_marks(row)]
        return f"<p><strong>Read with care:</strong> {_esc(', '.join(notes))}</p>" if notes else ""

    def target_figure(
        self,
        model: str,
        image_id: str,
        maps: dict[str, np.ndarray],
        pairs: pd.DataFrame,
        known: pd.Series | None,
        class_name: str,
        picture: np.ndarray | None,
        out: Path,
    ) -> Path:
        """The image and every method's map of one of its targets, each titled with its agreement with the others."""
        with_others = {
            method: pairs.loc[(pairs["method_a"] == method) | (pairs["method_b"] == method), "iou"].mean()
            for method in maps
        }
        subtitles = {method: f"IoU w/ others {value:.2f}" for method, value in with_others.items() if pd.notna(value)}
        if LIME_UNCERTAINTY_PANEL in maps:
            subtitles[LIME_UNCERTAINTY_PANEL] = "std error (map units)"
        title = f"{model} · {image_id} · class {class_name}"
        if known is not None:
            title += f" · mean IoU {known['iou_mean']:.2f} · rank {known['rank']}"
        return figures.comparison_grid(picture, maps, title, out, subtitles)

    def write_image_page(
        self,
        page: _ImagePage,
        predictions: pd.DataFrame,
        agreement: pd.DataFrame,
        localization: pd.DataFrame,
        faithfulness: pd.DataFrame,
    ) -> None:
        path = self.out / page.href
        path.parent.mkdir(parents=True, exist_ok=True)
        figure = (
            f'<img class="fig" src="../{_esc(page.figure.relative_to(self.out).as_posix())}" '
            f'alt="maps of {_esc(page.image_id)}">'
            if page.figure
            else ""
        )
        topk = (
            pd.DataFrame(predictions["topk"].iloc[0])
            if not predictions.empty and predictions["topk"].iloc[0] is not None
            else pd.DataFrame()
        )
        figure += "".join(
            f'<img class="fig" src="../{_esc(path.relative_to(self.out).as_posix())}" '
            f'alt="maps of {_esc(page.image_id)}, target {number + 2}">'
            for number, path in enumerate(page.target_figures)
        )
        body = [
            f'<p><a href="../index.html">← run {_esc(self.run_id)}</a></p>',
            f"<h1>{_esc(page.model)} · <code>{_esc(page.image_id)}</code></h1>",
            f'<p class="muted">{_esc(", ".join(page.tags))}</p>' if page.tags else "",
            self.method_notes(page.model),
            figure,
            "<h2>Prediction</h2>",
            _table(topk),
            "<h2>Agreement</h2>",
            _table(agreement.drop(columns=["model", "image_id"])),
            "<h2>Localization</h2>",
            _table(localization.drop(columns=["model", "image_id"])),
            "<h2>Faithfulness</h2>",
            _table(faithfulness.drop(columns=["model", "image_id"])),
        ]
        if not page.lime.empty:
            body += ["<h2>LIME: samples and uncertainty</h2>", _table(lime_uncertainty_table(page.lime))]
        if page.concept_figure is not None:
            concept_rows = page.concepts.drop(
                columns=["model", "image_id", "heatmap", "heatmap_height", "heatmap_width"]
            )
            body += [
                "<h2>Concepts behind the target class</h2>",
                f'<img class="fig" src="../{_esc(page.concept_figure.relative_to(self.out).as_posix())}" '
                f'alt="concepts of {_esc(page.image_id)}">',
                _table(concept_rows),
            ]
        path.write_text(_page(f"{page.model} {page.image_id}", "\n".join(body), "../style.css"))


LIME_UNCERTAINTY_COLUMNS = [
    "model",
    "image_id",
    "target",
    "samples_used",
    "num_samples",
    "adaptive",
    "rounds",
    "stopped_early",
    "std_errors",
    "height",
    "width",
    "map",
]
LIME_UNCERTAINTY_PANEL = "lime ± std error"
"""The panel beside LIME's map: each pixel's superpixel standard error, in the map's units."""


def lime_uncertainty_panel(rows: pd.DataFrame, target: int) -> dict[str, np.ndarray]:
    """The uncertainty map of ``target``'s LIME map as a figure panel (none if the run stored none)."""
    rows = rows[rows["target"] == target]
    return {} if rows.empty else {LIME_UNCERTAINTY_PANEL: decode_map(rows.iloc[0])}


def lime_uncertainty_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per LIME map of an image: the model evaluations it used (of the cap) and its weights' uncertainty."""
    return pd.DataFrame(
        {
            "target": rows["target"],
            "samples used": rows["samples_used"],
            "cap": rows["num_samples"],
            "adaptive": rows["adaptive"],
            "rounds": rows["rounds"],
            "stopped early": rows["stopped_early"],
            "mean std error": [float(np.nanmean(errors)) if len(errors) else np.nan for errors in rows["std_errors"]],
            "max std error": [float(np.nanmax(errors)) if len(errors) else np.nan for errors in rows["std_errors"]],
        }
    )


def _replace_folder(staging: Path, final: Path) -> None:
    """Move ``staging`` to ``final``, replacing an older report (readers never see a half-written one)."""
    old = final.with_name(f".old-{uuid.uuid4().hex}-{final.name}")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def write_report(store: ResultsStore, run_id: str) -> str:
    """Write the report of ``run_id`` under ``<results>/reports/<run_id>/``; returns its index.html."""
    require_run(store, run_id)
    final = report_folder(store, run_id)
    if store.local:
        parent = Path(final).parent
        parent.mkdir(parents=True, exist_ok=True)
        staging = parent / f".tmp-{uuid.uuid4().hex}-{Path(final).name}"
        staging.mkdir()
        try:
            _Report(store, run_id, staging).build()
            _replace_folder(staging, Path(final))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return str(Path(final) / "index.html")
    with tempfile.TemporaryDirectory() as local:
        _Report(store, run_id, Path(local)).build()
        # an object store has no atomic folder swap: drop the old report, then upload the new one
        if store.fs.exists(final):
            store.fs.rm(final, recursive=True)
        store.fs.put(f"{local}/", final, recursive=True)
    return store.fs.unstrip_protocol(f"{final}/index.html")
