"""Target 5: our Network Dissection vs NetDissect-Lite's algorithm (:mod:`benchmarks.netdissect_reference`).

Both sides get the same inputs, held in memory: the spatial activations of layer1-layer4 of the
demo model (``tiny``: the random-weight ResNet18 of :func:`benchmarks.bench_pipeline.tiny_config`)
on the world's probe images, and the images' concept masks and image-level labels, read once by
our probe reader (the reference gets each layer as a float64 ``[images, units, h, w]`` array, as its
``feature_extraction`` memory-maps it, and one concept map per image). Timed, alternating, on one
thread (the reference is single-threaded numpy and Pillow), each side computes its own thresholds
and then the IoUs of every unit and label of the four layers:

* ours: :func:`xai_audit.tasks.dissect.netdissect.dissect_layers` as the pipeline calls it (exact
  thresholds: three passes; then the tally with top images; no permutation test);
* reference: ``quantile_threshold`` (its quantile sketch) then ``tally`` (per image, per unit:
  Pillow-bilinear upsampling, threshold, bincounts).

Untimed, the reference then tallies again with *our* thresholds, and our :class:`IoUTally` is read
out with the same ones: intersections, label areas and the paper's IoU (all images in the union,
which our union rule equals on the world, where every image annotates every category) must be
identical; NetDissect-Lite's own union rule (a unit's area counts for a category only in images
where its active pixels touch that category) is compared too and reported as it is. Threshold
agreement compares the reference's sketch thresholds with our exact order statistics.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from benchmarks import netdissect_reference as reference
from benchmarks.bench_pipeline import base_config
from benchmarks.harness import Result, compare

TARGETS = ("5 Network Dissection vs NetDissect-Lite reference speed-up",)
SETTINGS = {
    "tiny": dict(probe_images=12, repeats=1),
    "cpu": dict(probe_images=200, repeats=3),
    "gpu": dict(probe_images=200, repeats=3),
}
GOAL = 3.0


def probe_inputs(size: str) -> dict[str, Any]:
    """The shared inputs: per batch our ``DissectBatch``; per layer the stacked activations; labels."""
    from xai_audit.tasks.core.config import parse_config
    from xai_audit.tasks.data.loaded_models import using_model
    from xai_audit.tasks.dissect.probe import dissect_batches, open_probe
    from xai_audit.tasks.dissect.stage import model_layers

    data = json.loads(json.dumps(base_config(size)))
    data["device"] = "cpu"
    data["dissect"]["probe"]["limit"] = SETTINGS[size]["probe_images"]
    config = parse_config(data)
    probe = open_probe(config)
    with using_model(config, config.models[0]) as model:
        layers = model_layers(model, config.models[0].layers)
        batches = list(
            dissect_batches(
                probe, model.preprocess, model.module, layers, config.dissect.probe.batch_size, torch.device("cpu")
            )
        )
    broden = probe.broden()
    settings = config.dissect.netdissect
    categories = [c for c in broden.categories if settings.categories is None or c in settings.categories]
    concept_maps = []
    for batch in batches:
        for masks, image_labels in zip(batch.masks, batch.image_labels):
            height, width = next(iter(masks.values())).shape[-2:]
            concept_maps.append({**masks, **{c: list(v) for c, v in image_labels.items()}, "sh": height, "sw": width})
    return {
        "config": config,
        "layers": layers,
        "batches": batches,
        "features": {layer: torch.cat([b.acts[layer] for b in batches]).double().numpy() for layer in layers},
        "concept_maps": concept_maps,
        "categories": categories,
        "label_names": broden.label_names,
        "label_category": {k: v for k, v in broden.label_category.items() if k > 0},
    }


def ours(inputs: dict[str, Any], thresholds: dict[str, torch.Tensor] | None = None) -> dict:
    """Our dissection of every layer, as :func:`xai_audit.tasks.dissect.stage.netdissect_rows` runs it."""
    from xai_audit.tasks.dissect.netdissect import dissect_layers

    config = inputs["config"]
    settings = config.dissect.netdissect
    return dissect_layers(
        lambda: iter(inputs["batches"]),
        inputs["label_names"],
        inputs["label_category"],
        thresholds=thresholds,
        quantile=settings.quantile,
        iou_threshold=settings.iou_threshold,
        threshold=settings.threshold,
        categories=settings.categories,
        top_k=config.dissect.top_concepts,
        top_images=config.dissect.top_images,
        tie_tolerance=config.dissect.tie_tolerance,
    )


def stock(inputs: dict[str, Any], thresholds: dict[str, np.ndarray] | None = None) -> dict[str, dict]:
    """NetDissect-Lite's thresholds (unless given) and tally of every layer."""
    quantile = inputs["config"].dissect.netdissect.quantile
    results = {}
    for layer, features in inputs["features"].items():
        threshold = thresholds[layer] if thresholds else reference.quantile_threshold(features, quantile)
        results[layer] = reference.tally(
            features, inputs["concept_maps"], threshold, inputs["categories"], inputs["label_category"]
        )
        results[layer]["threshold"] = threshold
    return results


def our_tallies(inputs: dict[str, Any], thresholds: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """Per layer ``(labels, iou, intersection, union)`` of our :class:`IoUTally` with ``thresholds``."""
    from xai_audit.tasks.dissect.netdissect import IoUTally

    tallies = {
        layer: IoUTally(
            t,
            label_categories=inputs["label_category"],
            categories=inputs["config"].dissect.netdissect.categories,
            top_images=0,
        )
        for layer, t in thresholds.items()
    }
    for batch in inputs["batches"]:
        for layer, tally in tallies.items():
            tally.update(batch.acts[layer], batch.masks, batch.image_labels)
    out = {}
    for layer, tally in tallies.items():
        labels, _, iou, inter, union = tally.scores()
        out[layer] = (labels, iou.numpy(), inter.numpy(), union.numpy())
    return out


def agreement(inputs: dict[str, Any], our_frames: dict, stock_own: dict[str, dict]) -> dict[str, Any]:
    """IoU and label agreement with identical thresholds; threshold agreement when each computes its own."""
    thresholds = {layer: torch.tensor(frame["threshold"].to_numpy(np.float32)) for layer, frame in our_frames.items()}
    same = stock(inputs, {layer: t.double().numpy() for layer, t in thresholds.items()})
    mine = our_tallies(inputs, thresholds)
    name_to_label = {name: label for label, name in inputs["label_names"].items()}
    iou_diff = lite_diff = inter_differing = inter_total = 0.0
    counts_identical = True
    units = labelled = same_label = lite_same = lite_labelled = own_same = 0
    threshold_rel = []
    for layer, (labels, iou, inter, union) in mine.items():
        ref = same[layer]
        paper = reference.paper_iou(ref)[:, labels]
        counts_identical &= bool(np.array_equal(inter, ref["tally_both"][:, labels]))
        inter_differing += float(np.abs(inter - ref["tally_both"][:, labels]).sum())
        inter_total += float(inter.sum())
        union_ref = ref["tally_units"][:, None] + ref["tally_labels"][None, labels] - ref["tally_both"][:, labels]
        counts_identical &= bool(np.array_equal(union, union_ref))
        iou_diff = max(iou_diff, float(np.abs(iou - paper).max()))
        lite_diff = max(lite_diff, float(np.abs(iou - ref["iou"][:, labels]).max()))
        best = np.asarray(labels)[paper.argmax(axis=1)]
        ours_best = np.array([name_to_label[c] for c in our_frames[layer]["concept"]])
        scored = paper.max(axis=1) > 0
        units += len(best)
        labelled += int(scored.sum())
        same_label += int((best == ours_best)[scored].sum())
        lite_scored = ref["score"] > 0
        lite_labelled += int(lite_scored.sum())
        lite_same += int((ref["label"] == ours_best)[lite_scored].sum())
        own = stock_own[layer]
        own_best = np.asarray(labels)[reference.paper_iou(own)[:, labels].argmax(axis=1)]
        own_same += int((own_best == ours_best)[scored].sum())
        exact = thresholds[layer].double().numpy()
        features = inputs["features"][layer]
        spread = features.max(axis=(0, 2, 3)) - features.min(axis=(0, 2, 3))
        threshold_rel += list(np.abs(own["threshold"] - exact) / np.maximum(spread, 1e-12))
    return {
        "units": units,
        "units_with_a_label": labelled,
        "same_thresholds_max_abs_iou_diff": iou_diff,
        "same_thresholds_counts_identical": counts_identical,
        "same_thresholds_intersection_pixels_differing": inter_differing,
        "same_thresholds_intersection_pixels": inter_total,
        "same_thresholds_same_label_rate": round(same_label / max(labelled, 1), 4),
        "lite_union_rule_max_abs_iou_diff": round(lite_diff, 4),
        "lite_union_rule_same_label_rate": round(lite_same / max(lite_labelled, 1), 4),
        "own_thresholds_median_diff_over_range": float(np.median(threshold_rel)),
        "own_thresholds_max_diff_over_range": float(np.max(threshold_rel)),
        "own_thresholds_same_label_rate": round(own_same / max(labelled, 1), 4),
    }


def run(size: str) -> list[Result]:
    inputs = probe_inputs(size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference is single-threaded numpy and Pillow: one core each
    try:
        timing = compare(
            "netdissect",
            ours=lambda: ours(inputs),
            stock=lambda: stock(inputs),
            repeats=SETTINGS[size]["repeats"],
            warmup=0,
        )
        extra = agreement(inputs, timing.ours_output, timing.stock_output)
    finally:
        torch.set_num_threads(threads)
    n_images = len(inputs["concept_maps"])
    layers = "-".join((inputs["layers"][0], inputs["layers"][-1]))
    return [
        Result.speedup(
            TARGETS[0],
            timing,
            GOAL,
            note=f"{layers} of the {'demo' if size != 'tiny' else 'tiny'} model, {n_images} world probe images in "
            f"memory, thresholds + IoUs, one thread each, median of {len(timing.ours_s)} alternating rounds; "
            f"same thresholds: "
            f"max |IoU diff| {extra['same_thresholds_max_abs_iou_diff']:.1e}, same label "
            f"{extra['same_thresholds_same_label_rate']:.0%}",
            images=n_images,
            **extra,
        )
    ]
