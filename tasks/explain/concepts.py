"""Concept attributions: which labelled concepts an image's target class rests on, and where.

This joins the two halves of an audit: the dissect stage says what each unit of a layer detects,
the explain stage which class each image is explained for. For every image and target:

- **Unit contributions** (``unit_contributions`` table): unit k's contribution to the target
  logit y is gradient × activation summed over the map, ``c_k = Σ_ij A_kij · ∂y/∂A_kij``. Why
  this one: where the layer is followed by global average pooling and a linear head (the last
  block of a ResNet, the setting of CAM, Zhou et al. 2016), ``∂y/∂A_kij = w_k / hw`` and so
  ``c_k = w_k · mean(A_k)`` exactly, and ``Σ_k c_k + bias = y``: the logit decomposes over the
  units without approximation. Deeper inside the network it is the first-order Taylor term
  (gradient × input). Grad-CAM's channel weight × mean activation equals it only where the
  gradient is spatially constant; gradient × activation also keeps a spatial density
  ``A_k ⊙ ∂y/∂A_k`` whose sum is ``c_k``.
- **Concept attributions** (``concept_attribution`` table): per labelling method, the units that
  count for a concept (:func:`xai_audit.tasks.dissect.base.counts_for_concept`) are grouped by it; a
  concept's contribution is the sum of its units', its share that sum over the layer's total
  positive contribution (all units, labelled or not, so unlabelled evidence lowers every share),
  and its heatmap the sum of its units' densities at the layer's resolution (its sum is the
  contribution). The top ``explain.concepts.top_k`` concepts by contribution are kept.
- **Ablation check**: zeroing the top concept's units (the layer's output channels) must lower
  the target probability more than zeroing as many randomly drawn labelled units of other
  concepts; both drops are stored on the rank-1 row.

Everything here is recomputable from the tables: concept contributions and shares from the
stored unit contributions and the ``neurons`` labels (``tests/test_concept_attribution.py``).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from xai_audit.storage.maps import encode_heatmap
from xai_audit.tasks.compute.precision import autocast_context
from xai_audit.tasks.data.layer_layout import layout_of
from xai_audit.tasks.dissect.base import counts_for_concept

UNIT_LABEL_COLUMNS = ["layer", "unit", "method", "concept", "category", "interpretable"]
"""The ``neurons`` columns :func:`layer_labels` reads."""


@dataclass(frozen=True)
class UnitLabel:
    concept: str
    category: str | None


LayerLabels = Mapping[str, Mapping[int, UnitLabel]]
"""Labelling method -> unit -> the label it counts for (units that count for none are absent)."""


def layer_labels(neurons: pd.DataFrame, layer: str) -> dict[str, dict[int, UnitLabel]]:
    """The counted labels of ``layer``'s units per labelling method, from ``neurons`` rows of one model."""
    rows = neurons[neurons["layer"] == layer]
    rows = rows[counts_for_concept(rows)]
    labels: dict[str, dict[int, UnitLabel]] = {}
    for method, unit, concept, category in zip(rows["method"], rows["unit"], rows["concept"], rows["category"]):
        labels.setdefault(str(method), {})[int(unit)] = UnitLabel(
            str(concept), None if pd.isna(category) else str(category)
        )
    return labels


@dataclass
class Contributions:
    """Gradient × activation of one batch at one layer."""

    units: np.ndarray
    """float32 ``[B, C]``: each unit's contribution to its image's target logit."""
    density: np.ndarray
    """float32 ``[B, C, h, w]``: where on the layer's grid each contribution arises (sums to ``units``)."""
    logits: np.ndarray
    """float32 ``[B]``: the target logits the contributions decompose."""


def unit_contributions(
    module: nn.Module,
    layers: Mapping[str, nn.Module],
    images: Tensor,
    targets: Sequence[int],
    amp_dtype: torch.dtype | None = None,
) -> dict[str, Contributions]:
    """Every unit's contribution to each image's target logit (module docstring) at each of
    ``layers`` (name -> module, each with ``[B, C, h, w]`` output), from one forward and one backward.

    Each hook hands the rest of the network a clone of the layer's output, so an in-place op
    downstream cannot change the captured tensor; a layer whose output needs no gradient (frozen
    weights) becomes a leaf that does.
    """
    captured: dict[str, Tensor] = {}

    def hook(name):
        def capture(_module, _inputs, output):
            # Token sequences and channels-last maps (transformers) are refused rather than mis-read.
            if not isinstance(output, Tensor) or output.dim() != 4 or layout_of(output).kind != "nchw":
                shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                raise ValueError(f"concept attributions need [B, C, h, w] output at {name}, got {shape}")
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            captured[name] = output
            return output.clone()

        return capture

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    # inference_mode(False): a caller's inference mode would forbid the backward.
    with torch.inference_mode(False), torch.enable_grad():
        try:
            with autocast_context(images.device, amp_dtype):
                logits = module(images)
        finally:
            for handle in handles:
                handle.remove()
        missing = sorted(set(layers) - set(captured))
        if missing:
            raise ValueError(f"layer(s) {missing} did not run in the model's forward")
        chosen = torch.as_tensor(list(targets), device=logits.device)
        target_logits = logits.float()[torch.arange(len(targets), device=logits.device), chosen]
        names = list(captured)
        gradients = torch.autograd.grad(target_logits.sum(), [captured[name] for name in names])
    results = {}
    for name, gradient in zip(names, gradients):
        density = (captured[name].detach().float() * gradient.float()).cpu().numpy()
        units = density.astype(np.float64).sum(axis=(2, 3)).astype(np.float32)
        results[name] = Contributions(units, density, target_logits.detach().cpu().numpy().astype(np.float32))
    return results


@dataclass(frozen=True)
class ConceptScore:
    """One concept's attribution in one image (a ``concept_attribution`` row without its keys)."""

    concept: str
    category: str | None
    rank: int
    units: tuple[int, ...]
    contribution: float
    share: float
    heatmap: np.ndarray


def positive_total(units: np.ndarray) -> float:
    """The denominator of every share: the sum of the layer's positive unit contributions."""
    return float(np.clip(units.astype(np.float64), 0, None).sum())


def concept_scores(
    units: np.ndarray, density: np.ndarray | None, labels: Mapping[int, UnitLabel], top_k: int
) -> list[ConceptScore]:
    """The ``top_k`` concepts of one image by contribution (ties: by concept name); none when no
    unit contributes positively (there is nothing to share out).

    ``units`` is the image's stored float32 contributions ``[C]``; sums run in float64 over them,
    so recomputing from the ``unit_contributions`` table gives the same numbers exactly.
    """
    members: dict[str, list[int]] = {}
    categories: dict[str, str | None] = {}
    for unit, label in sorted(labels.items()):
        if unit < len(units):
            members.setdefault(label.concept, []).append(unit)
            categories.setdefault(label.concept, label.category)
    total = positive_total(units)
    if total <= 0:
        return []
    summed = {concept: float(units[group].astype(np.float64).sum()) for concept, group in members.items()}
    ranked = sorted(summed, key=lambda concept: (-summed[concept], concept))[:top_k]
    return [
        ConceptScore(
            concept,
            categories[concept],
            rank,
            tuple(members[concept]),
            summed[concept],
            summed[concept] / total,
            density[members[concept]].sum(axis=0) if density is not None else np.zeros((0, 0), np.float32),
        )
        for rank, concept in enumerate(ranked, start=1)
    ]


def random_units(
    labels: Mapping[int, UnitLabel], exclude: Sequence[int], count: int, seed: int, image_id: str
) -> list[int]:
    """``count`` labelled units outside ``exclude`` drawn for one image (fewer when the layer has
    fewer), seeded by the run's seed and the image id, so a rerun draws the same ones."""
    pool = sorted(set(labels) - set(exclude))
    rng = np.random.default_rng([seed, zlib.crc32(image_id.encode())])
    return sorted(rng.choice(pool, size=min(count, len(pool)), replace=False).tolist()) if pool else []


def ablated_probabilities(
    module: nn.Module,
    layer: nn.Module,
    images: Tensor,
    targets: Sequence[int],
    ablations: Sequence[Sequence[Sequence[int]]],
    channels: int,
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Target probability of each image with each of its unit sets zeroed at ``layer``'s output
    (``channels`` wide).

    ``ablations[i]`` lists image i's unit sets (the same number for every image); one forward
    runs all (image, set) pairs. Returns ``[B, sets]`` float32.
    """
    sets = len(ablations[0]) if ablations else 0
    if sets == 0:
        return np.zeros((len(targets), 0), np.float32)
    keep = torch.ones(len(targets) * sets, channels, 1, 1, device=images.device)
    for row, unit_set in enumerate(unit_set for per_image in ablations for unit_set in per_image):
        keep[row, list(unit_set)] = 0

    def zero_units(_module, _inputs, output):
        return output * keep.to(output.dtype)

    handle = layer.register_forward_hook(zero_units)
    try:
        with torch.no_grad(), autocast_context(images.device, amp_dtype):
            probabilities = torch.softmax(module(images.repeat_interleave(sets, dim=0)).float(), dim=-1)
    finally:
        handle.remove()
    chosen = torch.as_tensor([t for t in targets for _ in range(sets)], device=probabilities.device)
    return probabilities[torch.arange(len(chosen)), chosen].view(len(targets), sets).cpu().numpy()


@dataclass(frozen=True)
class AttributionBatch:
    """What :func:`attribution_rows` needs of one explained batch."""

    model: str
    image_ids: Sequence[str]
    targets: Sequence[int]
    target_probabilities: np.ndarray
    """float32 ``[B]``: each image's target probability without ablation."""
    usable: np.ndarray
    """bool ``[B]``: images whose maps were written (the others get no rows)."""


def attribution_rows(
    module: nn.Module,
    layers: Mapping[str, tuple[nn.Module, LayerLabels]],
    images: Tensor,
    batch: AttributionBatch,
    top_k: int,
    ablation: bool,
    seed: int,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, list[dict]]:
    """The batch's ``unit_contributions`` and ``concept_attribution`` rows at each of ``layers``
    (name -> (module, its unit labels)); see the module docstring."""
    contributions = unit_contributions(
        module, {name: layer for name, (layer, _) in layers.items()}, images, batch.targets, amp_dtype
    )
    usable = [index for index in range(len(batch.image_ids)) if batch.usable[index]]
    rows: dict[str, list[dict]] = {"unit_contributions": [], "concept_attribution": []}
    for layer_name, (layer, labels) in layers.items():
        found = contributions[layer_name]
        keys = {
            index: {
                "model": batch.model,
                "image_id": batch.image_ids[index],
                "target": int(batch.targets[index]),
                "layer": layer_name,
            }
            for index in usable
        }
        for index in usable:
            rows["unit_contributions"].append(
                {**keys[index], "contributions": found.units[index].tolist(), "logit": float(found.logits[index])}
            )
        for method, units in sorted(labels.items()):
            scored = {index: concept_scores(found.units[index], found.density[index], units, top_k) for index in usable}
            drops = (
                _ablation_drops(module, layer, images, batch, scored, units, seed, found.units.shape[1], amp_dtype)
                if ablation
                else {}
            )
            for index, scores in scored.items():
                for score in scores:
                    drop, random_drop, random_count = drops.get(index, (None,) * 3) if score.rank == 1 else (None,) * 3
                    rows["concept_attribution"].append(
                        {
                            **keys[index],
                            "method": method,
                            "concept": score.concept,
                            "category": score.category,
                            "rank": score.rank,
                            "units": len(score.units),
                            "contribution": score.contribution,
                            "share": score.share,
                            **encode_heatmap(score.heatmap),
                            "ablation_drop": drop,
                            "random_drop": random_drop,
                            "random_units": random_count,
                        }
                    )
    return rows


def _ablation_drops(module, layer, images, batch, scored, labels, seed, channels, amp_dtype):
    """image index -> (drop when the top concept's units are zeroed, drop for as many random
    labelled units of other concepts, how many were drawn)."""
    chosen = [index for index, scores in scored.items() if scores]
    if not chosen:
        return {}
    sets = []
    for index in chosen:
        top = scored[index][0].units
        sets.append([list(top), random_units(labels, top, len(top), seed, batch.image_ids[index])])
    probabilities = ablated_probabilities(
        module, layer, images[chosen], [batch.targets[index] for index in chosen], sets, channels, amp_dtype
    )
    return {
        index: (
            float(batch.target_probabilities[index] - probabilities[row, 0]),
            float(batch.target_probabilities[index] - probabilities[row, 1]) if sets[row][1] else None,
            len(sets[row][1]),
        )
        for row, index in enumerate(chosen)
    }
