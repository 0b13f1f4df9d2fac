"""Network Dissection (Bau et al., CVPR 2017): score each unit against every segmentation label.

For unit k, ``T_k`` is the top-``quantile`` level (default 0.005) of its activations over all
probe images and positions, at the layer's native resolution: the paper's ``P(a_k > T_k) = q``.
By default it is the exact order statistic of ascending rank ``⌊(1 − q)(N − 1)⌋``
(``torch.quantile(..., interpolation="lower")``), and a value counts as active only when it is
strictly above it, so ties at the threshold stay inactive and at most ``⌈q(N − 1)⌉`` values are
active. (The values strictly above it are exactly those strictly above the linearly interpolated
``1 − q`` quantile, which NetDissect-Lite reads out of its quantile sketch.) Each activation map is
upsampled bilinearly to the segmentation size, ``A_k = up > T_k``, and

    IoU(k, c) = Σ_images |A_k ∩ L_c| / Σ_images |A_k ∪ L_c|

where image-level labels (scene, texture in Broden) are masks covering the whole image. A unit is
*interpretable* when its best IoU reaches ``iou_threshold`` (default 0.04).

Everything streams: memory is set by the batch, the number of units and the number of labels,
never by the number of probe images. Thresholds come from a per-unit histogram whose range
shifts or doubles as values arrive, keeping counts exact, then from passes that narrow a bracket
around the order statistic until it is pinned down (:class:`UnitQuantile`; ``threshold:
histogram`` stops after the first pass, within one bin); intersections and unions are then
tallied batch by batch (:class:`IoUTally`). Exact thresholds take three passes over the
activations in practice (one more, rarely), the histogram two.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from xai_audit.tasks.core.errors import ConfigError
from xai_audit.tasks.dissect.significance import ShuffledIntersections
from xai_audit.tasks.dissect.ties import DEFAULT_TIE_TOLERANCE, tied_concepts

DEFAULT_QUANTILE = 0.005
DEFAULT_IOU_THRESHOLD = 0.04
DEFAULT_BINS = 2048
ALL_IMAGES = "*"  # the unit-area group of labels whose categories are unknown
log = logging.getLogger(__name__)

# Bytes one chunk of histogram input (float64 values + bin indices) or of upsampled maps may take.
CHUNK_BUDGET_BYTES = 64 * 2**20
# Passes after the histogram that exact thresholds may take (one or two in practice).
MAX_REFINE_PASSES = 6


class DissectBatch(NamedTuple):
    """One probe batch as Network Dissection consumes it (plain tuples in this order work too).

    ``masks[i]`` maps each pixel-level category the image annotates to an int array ``[k, H, W]``
    of label numbers (0 = none; a pixel may carry several labels across the k layers);
    ``image_labels[i]`` maps each image-level category it annotates to a list of label numbers.
    A category absent from both dicts is *not annotated* for that image.
    """

    acts: Tensor | Mapping[str, Tensor]  # [b, units, h, w] at native resolution (per layer)
    masks: Sequence[Mapping[str, np.ndarray]]
    image_labels: Sequence[Mapping[str, Sequence[int]]] | None = None
    image_ids: Sequence[str] | None = None


# --------------------------------------------------------------------------------------------
# thresholds


def _unit_values(acts: Tensor) -> Tensor:
    """``[b, u, h, w]`` → ``[u, b·h·w]`` float64 (every activation of each unit in the batch)."""
    if acts.dim() != 4:
        raise ValueError(f"expected activations [batch, units, h, w], got shape {tuple(acts.shape)}")
    return acts.detach().transpose(0, 1).reshape(acts.shape[1], -1).to(torch.float64)


def _unit_step(n_units: int, values_per_unit: int) -> int:
    return max(1, min(n_units, CHUNK_BUDGET_BYTES // max(1, 16 * values_per_unit)))


class UnitQuantile:
    """Streaming per-unit upper quantile of activations, with a guaranteed error bound.

    Each unit keeps ``bins`` exact counts over an equal-width range. The range starts at the
    first batch's [min, max]; when later values fall outside it the grid shifts by whole bins or,
    if the values no longer fit, doubles its bin width by merging bin pairs, so counts stay exact.
    (If every value so far was equal, the width is 1e-7 of their magnitude until they spread.)
    The quantile's order statistic therefore lies in a known bin, and the estimate (interpolated
    by rank inside that bin) is within one bin width of it:

        |estimate − exact| ≤ width ≤ 2·(max − min)/(bins − 1)   (per unit, reported by estimate())

    where "exact" is the order statistic ``torch.quantile(x, 1 − q, interpolation="lower")``.
    :meth:`refine` spends further passes over the same activations to find that order statistic
    itself (:meth:`begin_pass`). Memory: ``units × bins`` int64 counts.
    """

    def __init__(self, quantile: float = DEFAULT_QUANTILE, bins: int = DEFAULT_BINS) -> None:
        if not 0 < quantile < 1:
            raise ConfigError("quantile", f"must be in (0, 1), got {quantile}")
        if bins < 2 or bins % 2:
            raise ConfigError("bins", f"must be an even number >= 2, got {bins}")
        self.quantile = quantile
        self.bins = bins
        self.counts: Tensor | None = None  # [u, bins] int64
        self.low: Tensor | None = None  # [u] float64, left edge of bin 0
        self.width: Tensor | None = None  # [u] float64
        self.total = 0
        self.passes = 0  # passes over the activations after the histogram's
        self.drifted = 0  # units whose activations changed between passes (see end_pass)
        self._exact: Tensor | None = None  # [u] float64, NaN until resolved (begin_pass)

    # ---- pass 1: adaptive histogram

    def _grow(self, vmin: Tensor, vmax: Tensor) -> None:
        """Re-grid units whose new values fall outside their range, keeping every count exact.

        In old-bin coordinates the needed extent is [m, M] (occupied bins and the new values).
        If it fits in ``bins`` bins the grid only shifts by m bins; otherwise adjacent pairs
        merge (width doubles), starting as near m as keeps every occupied bin, and the check
        repeats. Width therefore doubles only when the values span more than ``bins − 1`` bins:
        width ≤ 2·(max − min)/(bins − 1). Only the units that need it are touched.
        """
        bins = self.bins
        positions = torch.arange(bins, device=self.counts.device)
        while True:
            low_bin = ((vmin - self.low) / self.width).floor()
            high_bin = ((vmax - self.low) / self.width).floor()
            rows = ((low_bin < 0) | (high_bin > bins - 1)).nonzero().flatten()
            if rows.numel() == 0:
                return
            counts, low_bin, high_bin = self.counts[rows], low_bin[rows], high_bin[rows]
            occupied = counts > 0
            first = torch.where(occupied, positions, bins).amin(dim=1).double()
            last = torch.where(occupied, positions, -1).amax(dim=1).double()
            start = torch.minimum(first, low_bin)
            merge = torch.maximum(last, high_bin) - start + 1 > bins
            # A merge covers 2·bins old bins from its start: start as low as the new values ask
            # while the occupied bins stay covered; later iterations grow further if needed.
            start = torch.where(merge, torch.maximum(start, last - 2 * bins + 1), start).long()
            factor = merge.long() + 1
            # New bin i holds old bins start + factor·i + r for r < factor.
            regridded = torch.zeros_like(counts)
            for r in range(2):
                source = start[:, None] + factor[:, None] * positions[None, :] + r
                valid = (source >= 0) & (source < bins) & (r < factor[:, None])
                regridded += torch.where(valid, counts.gather(1, source.clamp(0, bins - 1)), 0)
            self.counts[rows] = regridded
            self.low[rows] += start.double() * self.width[rows]
            self.width[rows] *= factor.double()

    def update(self, acts: Tensor) -> None:
        """Add one batch of activations ``[b, units, h, w]``."""
        n_units = acts.shape[1]
        if self.counts is not None and n_units != self.counts.shape[0]:
            raise ValueError(f"batch has {n_units} units, earlier batches had {self.counts.shape[0]}")
        per_unit = acts.numel() // max(1, n_units)
        step = _unit_step(n_units, per_unit)
        vmin = acts.detach().amin(dim=(0, 2, 3)).double()
        vmax = acts.detach().amax(dim=(0, 2, 3)).double()
        if not (torch.isfinite(vmin).all() and torch.isfinite(vmax).all()):
            raise ValueError("activations contain NaN or infinite values")
        if self.counts is None:
            span = vmax - vmin
            # A flat first batch still needs a positive width; later batches grow it as needed.
            floor = (1e-7 * torch.maximum(vmax.abs(), vmin.abs())).clamp_min(1e-12)
            self.width = torch.maximum(span, floor) / self.bins * (1 + 1e-9)
            self.low = vmin.clone()
            self.counts = torch.zeros(n_units, self.bins, dtype=torch.int64, device=acts.device)
        else:
            self._grow(vmin, vmax)
        for start in range(0, n_units, step):
            rows = slice(start, start + step)
            values = _unit_values(acts[:, rows])
            index = ((values - self.low[rows, None]) / self.width[rows, None]).floor_().clamp_(0, self.bins - 1)
            offsets = torch.arange(values.shape[0], device=acts.device)[:, None] * self.bins
            flat = (index.long() + offsets).reshape(-1)
            self.counts[rows] += torch.bincount(flat, minlength=values.shape[0] * self.bins).view(-1, self.bins)
        self.total += per_unit

    def _rank(self) -> int:
        # Ascending 0-based rank of the order statistic torch.quantile(..., "lower") returns.
        return math.floor((1 - self.quantile) * (self.total - 1))

    @staticmethod
    def _locate(counts: Tensor, rank: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Bin holding ascending rank ``rank`` of each unit, the count below it and its count."""
        cumulative = counts.cumsum(dim=1)
        index = torch.searchsorted(cumulative, rank[:, None], right=True).clamp_(max=counts.shape[1] - 1)
        inside = counts.gather(1, index)[:, 0]
        below = cumulative.gather(1, index)[:, 0] - inside
        return index[:, 0], below, inside

    def estimate(self) -> tuple[Tensor, Tensor]:
        """``(thresholds [u], error_bound [u])`` from the histogram so far (float64)."""
        if self.counts is None or self.total == 0:
            raise ConfigError("probe", "no activations were seen; the probe set is empty")
        rank = torch.full((self.counts.shape[0],), self._rank(), dtype=torch.int64, device=self.counts.device)
        index, below, inside = self._locate(self.counts, rank)
        fraction = (rank - below + 0.5).double() / inside.clamp_min(1).double()
        thresholds = self.low + (index.double() + fraction) * self.width
        return thresholds, self.width.clone()

    # ---- further passes: exact selection inside a shrinking bracket

    @property
    def resolved(self) -> bool:
        """Whether every unit's exact order statistic is known (see :meth:`begin_pass`)."""
        return self._exact is not None and not bool(torch.isnan(self._exact).any())

    def begin_pass(self) -> bool:
        """Start one more pass over the same activations towards the exact order statistic.

        Each unresolved unit keeps a closed value bracket ``[lo, hi]`` known to hold it: after the
        histogram, three bins around the one holding its rank (so a value that round-off put in a
        neighbouring bin is still inside); after a refining pass, the observed min and max of the
        sub-bin holding it. A pass counts, exactly by comparison, the values below ``lo`` and
        histograms those inside into ``bins`` sub-bins with each sub-bin's min and max. The rank
        then falls in one sub-bin; it is resolved when that sub-bin holds one distinct value or the
        rank is its first or last member. Returns False when no pass is needed (all resolved).
        Memory: ``units × bins`` counts and two float64 extremes per sub-bin.
        """
        if self.total == 0:
            raise ConfigError("probe", "no activations were seen; the probe set is empty")
        if self._exact is None:
            rank = torch.full((self.counts.shape[0],), self._rank(), dtype=torch.int64, device=self.counts.device)
            index, _, _ = self._locate(self.counts, rank)
            self._lo = self.low + (index.double() - 1) * self.width
            self._hi = self.low + (index.double() + 2) * self.width
            self._exact = torch.full_like(self._lo, math.nan)
            self.counts = None  # the histogram is not needed again; free it for the pass's arrays
        pending = torch.isnan(self._exact).nonzero().flatten()
        if pending.numel() == 0:
            return False
        device, bins = self._exact.device, self.bins
        self._pending = pending
        self._below = torch.zeros(pending.numel(), dtype=torch.int64, device=device)
        self._sub_counts = torch.zeros(pending.numel(), bins, dtype=torch.int64, device=device)
        self._sub_min = torch.full((pending.numel(), bins), math.inf, dtype=torch.float64, device=device)
        self._sub_max = torch.full((pending.numel(), bins), -math.inf, dtype=torch.float64, device=device)
        self._pass_seen = 0
        return True

    def refine_update(self, acts: Tensor) -> None:
        """Add one batch of the current pass (the same activations as pass 1, in any batching)."""
        pending, bins = self._pending, self.bins
        acts = acts.detach()[:, pending.to(acts.device)]
        n_units = acts.shape[1]
        step = _unit_step(n_units, acts.numel() // max(1, n_units))
        for start in range(0, n_units, step):
            rows = slice(start, start + step)
            values = _unit_values(acts[:, rows])
            lo, hi = self._lo[pending[rows], None], self._hi[pending[rows], None]
            self._below[rows] += (values < lo).sum(dim=1)
            row, column = ((values >= lo) & (values <= hi)).nonzero(as_tuple=True)
            inside = values[row, column]
            span = (hi - lo)[row, 0]
            scaled = torch.where(span > 0, (inside - lo[row, 0]) / span.clamp_min(1e-300) * bins, 0.0)
            key = (row + start) * bins + scaled.floor_().clamp_(0, bins - 1).long()
            self._sub_counts.view(-1).index_add_(0, key, torch.ones_like(key))
            self._sub_min.view(-1).scatter_reduce_(0, key, inside, "amin")
            self._sub_max.view(-1).scatter_reduce_(0, key, inside, "amax")
        self._pass_seen += acts.numel() // max(1, n_units)

    def end_pass(self) -> None:
        """Resolve the units whose order statistic this pass pinned down; narrow the others."""
        if self._pass_seen != self.total:
            raise ValueError(f"this pass saw {self._pass_seen} activations per unit, the first pass {self.total}")
        pending = self._pending
        position = self._rank() - self._below  # rank among the values inside the bracket
        cumulative = self._sub_counts.cumsum(dim=1)
        # Outside the bracket only if the activations changed between passes (a non-deterministic
        # kernel): such a unit keeps the bracket's nearer edge, within one bracket of exact.
        drifted = (position < 0) | (position >= cumulative[:, -1])
        self.drifted += int(drifted.sum())
        sub = torch.searchsorted(cumulative, position.clamp(min=0)[:, None], right=True).clamp_(max=self.bins - 1)
        count = self._sub_counts.gather(1, sub)[:, 0]
        within = position - (cumulative.gather(1, sub)[:, 0] - count)
        low_value, high_value = self._sub_min.gather(1, sub)[:, 0], self._sub_max.gather(1, sub)[:, 0]
        first, last = (within == 0) | (low_value == high_value), within == count - 1
        resolved = torch.where(first, low_value, torch.where(last, high_value, math.nan))
        edge = torch.where(position < 0, self._lo[pending], self._hi[pending])
        self._exact[pending] = torch.where(drifted, edge, resolved)
        narrowed = ~drifted
        self._lo[pending[narrowed]], self._hi[pending[narrowed]] = low_value[narrowed], high_value[narrowed]
        self.passes += 1
        self._sub_counts = self._sub_min = self._sub_max = None

    def exact(self) -> Tensor:
        """The exact order statistic per unit ``[u]`` (float64), once :attr:`resolved`.

        Float32 values are at most ~2²⁴ apart in a bracket, and each pass divides a bracket's
        range by ``bins``, so a few passes always suffice; should :data:`MAX_REFINE_PASSES` not,
        the unresolved units take their bracket's top value (fewer than ``quantile`` of the
        values lie above it), which is never below the order statistic.
        """
        if self._exact is None:
            raise ConfigError("probe", "exact() needs begin_pass() and at least one pass first")
        return torch.where(torch.isnan(self._exact), self._hi, self._exact)

    def refine(self, activation_batches: Callable[[], Iterable[Tensor]]) -> Tensor:
        """Every further pass, each over ``activation_batches()``: the exact thresholds ``[u]``."""
        while self.passes < MAX_REFINE_PASSES and self.begin_pass():
            for acts in activation_batches():
                self.refine_update(acts)
            self.end_pass()
        return self.exact()


THRESHOLD_METHODS = ("exact", "histogram")


def unit_thresholds(
    activation_batches: Iterable[Tensor] | Callable[[], Iterable[Tensor]],
    quantile: float = DEFAULT_QUANTILE,
    *,
    bins: int = DEFAULT_BINS,
    method: str = "exact",
) -> Tensor:
    """Per-unit thresholds ``T_k`` ``[units]`` (float32): the top-``quantile`` activation value.

    ``exact`` (a factory, called once per pass) gives the order statistic itself, so exactly the
    activations strictly above it count as active; ``histogram`` reads the batches once and is
    within one bin of it (see :class:`UnitQuantile`).
    """
    if method not in THRESHOLD_METHODS:
        raise ConfigError("threshold", f"must be one of {', '.join(THRESHOLD_METHODS)}, got {method!r}")
    if method == "exact" and not callable(activation_batches):
        raise ConfigError("threshold", "exact thresholds need a batches factory (a callable), not an iterable")
    factory = activation_batches if callable(activation_batches) else (lambda: activation_batches)
    estimator = UnitQuantile(quantile, bins)
    for acts in factory():
        estimator.update(acts)
    thresholds = estimator.refine(factory) if method == "exact" else estimator.estimate()[0]
    return thresholds.float()


# --------------------------------------------------------------------------------------------
# IoU tally


def _as_int_masks(array: object, where: str) -> Tensor:
    mask = torch.as_tensor(np.asarray(array))
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3 or mask.dtype.is_floating_point or mask.dtype == torch.bool:
        raise ValueError(f"{where}: expected an integer label array [k, H, W], got {mask.dtype} {tuple(mask.shape)}")
    return mask.long()


class IoUTally:
    """Running Σ|A∩L| and Σ|A∪L| of every (unit, label) over a stream of probe batches.

    ``label_categories`` (label number → category, or several categories) enables Broden's
    practice of counting a unit's area, for a label's union, only over images that annotate one
    of the label's categories (Broden merges sources that each label only some categories).
    Labels not in it — or every label when it is None — use the paper's formula: all images.
    ``categories`` restricts the tally to those categories. ``seg_size`` is the segmentation size
    of images that come with no pixel masks (only image-level labels).

    Per batch only the (image, unit) maps whose native peak exceeds ``T_k`` are upsampled (the
    others cannot have an active pixel), in chunks, and only their active pixels are visited:
    the labels of those pixels are counted with one ``bincount`` per chunk, so only labels
    present there are touched. Memory: ``units × labels`` counts plus one chunk of upsampled maps
    (``CHUNK_BUDGET_BYTES``), independent of the number of images.
    """

    def __init__(
        self,
        thresholds: Tensor,
        *,
        label_categories: Mapping[int, str | Collection[str]] | None = None,
        categories: Collection[str] | None = None,
        seg_size: tuple[int, int] | None = None,
        top_images: int = 10,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.thresholds = thresholds.detach().to(self.device, torch.float32)
        self.n_units = self.thresholds.shape[0]
        self.categories = set(categories) if categories is not None else None
        self.seg_size = seg_size
        self.top_k = top_images
        # label -> its category tuple; unit areas are tallied per distinct tuple ("group").
        self._label_group: dict[int, tuple[str, ...]] = {}
        for label, cats in (label_categories or {}).items():
            self._label_group[int(label)] = (cats,) if isinstance(cats, str) else tuple(sorted(cats))
        self._groups: list[tuple[str, ...]] = [(ALL_IMAGES,)] + sorted(set(self._label_group.values()))
        self.group_area = torch.zeros(self.n_units, len(self._groups), dtype=torch.int64, device=self.device)
        self.intersection = torch.zeros(self.n_units, 1, dtype=torch.int64, device=self.device)
        self.label_pixels = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.seen_category: dict[int, str] = {}
        self.n_images = 0
        self._top_values = torch.full((self.n_units, 0), -math.inf, device=self.device)
        self._top_ids = np.empty((self.n_units, 0), dtype=object)

    # ---- helpers

    def _ensure_labels(self, largest: int) -> None:
        if largest >= self.label_pixels.shape[0]:
            grow = largest + 1 - self.label_pixels.shape[0]
            self.label_pixels = F.pad(self.label_pixels, (0, grow))
            self.intersection = F.pad(self.intersection, (0, grow))

    def _wanted(self, category: str) -> bool:
        return self.categories is None or category in self.categories

    def _image_size(self, masks: Mapping[str, object], where: str) -> tuple[int, int]:
        for category, array in masks.items():
            if self._wanted(category):
                shape = np.shape(array)
                return int(shape[-2]), int(shape[-1])
        if self.seg_size is None:
            raise ValueError(f"{where}: no pixel masks to take the segmentation size from; pass seg_size")
        return self.seg_size

    def _track_top_images(self, acts: Tensor, image_ids: Sequence[str]) -> None:
        peaks = acts.detach().amax(dim=(2, 3)).T.to(self.device, torch.float32)  # [u, b]
        values = torch.cat([self._top_values, peaks], dim=1)
        batch_ids = np.tile(np.asarray(list(image_ids), dtype=object), (self.n_units, 1))
        ids = np.concatenate([self._top_ids, batch_ids], axis=1)
        keep = min(self.top_k, values.shape[1])
        self._top_values, order = torch.topk(values, keep, dim=1)
        self._top_ids = np.take_along_axis(ids, order.cpu().numpy(), axis=1)

    # ---- the tally

    def update(
        self,
        acts: Tensor,
        masks: Sequence[Mapping[str, np.ndarray]],
        image_labels: Sequence[Mapping[str, Sequence[int]]] | None = None,
        image_ids: Sequence[str] | None = None,
    ) -> None:
        """Add one batch: activations ``[b, units, h, w]`` and each image's labels (see DissectBatch)."""
        batch = acts.shape[0]
        if acts.dim() != 4 or acts.shape[1] != self.n_units:
            raise ValueError(f"expected activations [b, {self.n_units}, h, w], got {tuple(acts.shape)}")
        image_labels = image_labels if image_labels is not None else [{}] * batch
        if len(masks) != batch or len(image_labels) != batch:
            raise ValueError(f"{batch} activation maps but {len(masks)} mask dicts and {len(image_labels)} label dicts")
        acts = acts.detach().to(self.device, torch.float32)
        if image_ids is not None and self.top_k > 0:
            self._track_top_images(acts, image_ids)

        by_size: dict[tuple[int, int], list[int]] = {}
        for i in range(batch):
            where = f"image {image_ids[i] if image_ids is not None else self.n_images + i}"
            by_size.setdefault(self._image_size(masks[i], where), []).append(i)
        for (height, width), members in by_size.items():
            self._update_group(acts, masks, image_labels, members, height, width, image_ids)
        self.n_images += batch

    def _update_group(self, acts, masks, image_labels, members, height, width, image_ids) -> None:
        pixels = height * width
        layers: list[list[Tensor]] = []
        annotated: list[set[str]] = []
        whole: list[tuple[int, int]] = []  # (member position, label) of image-level labels
        by_category: dict[str, list[Tensor]] = {}
        for pos, i in enumerate(members):
            stack, cats = [], set()
            for category, array in masks[i].items():
                if not self._wanted(category):
                    continue
                where = f"image {image_ids[i] if image_ids is not None else self.n_images + i}, category {category!r}"
                mask = _as_int_masks(array, where)
                if mask.shape[-2:] != (height, width):
                    raise ValueError(f"{where}: mask size {tuple(mask.shape[-2:])} differs from {height}x{width}")
                stack.append(mask.reshape(mask.shape[0], pixels))
                by_category.setdefault(category, []).append(stack[-1])
                cats.add(category)
            image_level: dict[int, None] = {}  # a label listed twice still covers the image once
            for category, labels in image_labels[i].items():
                if not self._wanted(category):
                    continue
                cats.add(category)
                for label in (int(v) for v in labels):
                    if label > 0:
                        image_level[label] = None
                        self.seen_category.setdefault(label, category)
            whole.extend((pos, label) for label in image_level)
            layers.append(stack)
            annotated.append(cats)

        # Pixel labels of the group as [g, k, H·W], duplicates within a pixel zeroed.
        depth = max((sum(m.shape[0] for m in stack) for stack in layers), default=0)
        pixel_labels = torch.zeros(len(members), max(depth, 1), pixels, dtype=torch.int64)
        for pos, stack in enumerate(layers):
            if stack:
                merged = torch.cat(stack)
                pixel_labels[pos, : merged.shape[0]] = merged
        for layer in range(1, depth):
            repeated = (pixel_labels[:, layer : layer + 1] == pixel_labels[:, :layer]).any(dim=1)
            pixel_labels[:, layer].masked_fill_(repeated, 0)
        for category, stacks in by_category.items():
            # a linear bincount, not unique's sort of every pixel (a negative number is no label)
            values = torch.cat([t.reshape(-1) for t in stacks]).clamp_min(0)
            for label in torch.bincount(values).nonzero().flatten().tolist():
                if label > 0:
                    self.seen_category.setdefault(label, category)
        pixel_labels = pixel_labels.to(self.device)
        largest = max([int(pixel_labels.max())] + [label for _, label in whole])
        self._ensure_labels(largest)
        n_labels = self.label_pixels.shape[0]
        present = pixel_labels[pixel_labels > 0]
        self.label_pixels += torch.bincount(present, minlength=n_labels)
        if whole:
            whole_labels = torch.tensor([label for _, label in whole], device=self.device)
            self.label_pixels += torch.bincount(whole_labels, minlength=n_labels) * pixels
            whole_pos = torch.tensor([pos for pos, _ in whole], device=self.device)

        # Which images count towards each unit-area group.
        in_group = torch.zeros(len(members), len(self._groups), dtype=torch.float64, device=self.device)
        for pos, cats in enumerate(annotated):
            for g, group in enumerate(self._groups):
                in_group[pos, g] = float(group == (ALL_IMAGES,) or bool(cats.intersection(group)))

        group_acts = acts[members]
        # Bilinear upsampling is a convex combination of native values, so a map whose native
        # peak is <= T_k has no active pixel: only (image, unit) pairs above it are upsampled.
        # At the default quantile that skips most pairs.
        image, unit = (group_acts.amax(dim=(2, 3)) > self.thresholds[None, :]).nonzero(as_tuple=True)
        area = torch.zeros(len(members), self.n_units, dtype=torch.int64, device=self.device)
        pixel_view = pixel_labels.permute(0, 2, 1)  # [g, H·W, k]
        step = max(1, CHUNK_BUDGET_BYTES // (pixels * 9))  # float32 map + bool mask + slack
        for start in range(0, image.numel(), step):
            pair_image, pair_unit = image[start : start + step], unit[start : start + step]
            # up(a) > T is computed as up(a − T) > 0: equal in exact arithmetic, but a float32
            # blend of values all equal to T can round above T, while a blend of zeros is zero
            # (and a − T is zero exactly when a == T), so a plateau at the threshold stays inactive.
            maps = group_acts[pair_image, pair_unit][:, None] - self.thresholds[pair_unit, None, None, None]
            upsampled = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
            active = upsampled.view(-1, pixels) > 0
            del upsampled
            pair, pixel = active.nonzero(as_tuple=True)
            del active
            area.index_put_((pair_image, pair_unit), torch.bincount(pair, minlength=pair_unit.numel()), accumulate=True)
            labels = pixel_view[pair_image[pair], pixel]  # [active pixels, k]
            # Label 0 (no label) lands in column 0, which is never reported.
            keys = (pair_unit[pair][:, None] * n_labels + labels).view(-1)
            self.intersection += torch.bincount(keys, minlength=self.n_units * n_labels).view(self.n_units, n_labels)
        self.group_area += (area.T.double() @ in_group).round_().long()
        if whole:
            self.intersection.index_add_(1, whole_labels, area[whole_pos].T)

    # ---- results

    def _group_of(self, label: int) -> int:
        group = self._label_group.get(label)
        return self._groups.index(group) if group is not None else 0

    def scores(self) -> tuple[list[int], list[str | None], Tensor, Tensor, Tensor]:
        """``(labels, categories, iou, intersection, union)`` of every label seen so far; the
        tensors are ``[units, len(labels)]`` (iou float64, counts int64), on the tally's device."""
        labels = torch.nonzero(self.label_pixels > 0).flatten()
        label_list = labels.tolist()
        groups = torch.tensor([self._group_of(label) for label in label_list], dtype=torch.long, device=self.device)
        inter = self.intersection[:, labels]
        union = self.group_area[:, groups] + self.label_pixels[labels][None, :] - inter
        union = torch.maximum(union, inter)  # a label seen outside its declared categories
        iou = inter.double() / union.clamp_min(1).double()
        categories = [
            self._label_group[label][0] if label in self._label_group else self.seen_category.get(label)
            for label in label_list
        ]
        return label_list, categories, iou, inter, union

    def result(self) -> pd.DataFrame:
        """Long table of every (unit, label seen): unit, label, category, iou, intersection, union."""
        labels, categories, iou, inter, union = self.scores()
        n_labels = len(labels)
        return pd.DataFrame(
            {
                "unit": np.repeat(np.arange(self.n_units, dtype=np.int32), n_labels),
                "label": np.tile(np.asarray(labels, dtype=np.int32), self.n_units),
                "category": np.tile(np.asarray(categories, dtype=object), self.n_units),
                "iou": iou.cpu().numpy().reshape(-1),
                "intersection": inter.cpu().numpy().reshape(-1),
                "union": union.cpu().numpy().reshape(-1),
            }
        )

    def top_images(self) -> list[list[str]]:
        """Per unit, the ids of the images with the highest peak activation (highest first)."""
        return [list(row) for row in self._top_ids] if self._top_ids.shape[1] else [[] for _ in range(self.n_units)]


# --------------------------------------------------------------------------------------------
# one layer, end to end


def unit_labels(
    iou: Tensor,
    labels: Sequence[int],
    categories: Sequence[str | None],
    label_names: Mapping[int, str],
    *,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    top_k: int = 5,
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE,
) -> pd.DataFrame:
    """Per unit of ``iou`` ``[units, len(labels)]``: best label overall (``concept``,
    ``category``, ``score`` = IoU), ``top_concepts`` (best ``top_k`` as ``{"concept", "score"}``,
    best first), ``best_per_category`` (``{"category", "concept", "score"}``),
    ``interpretable`` (best IoU ≥ ``iou_threshold``) and ``tied_with`` (the other labels within
    ``tie_tolerance`` of the best, see :mod:`xai_audit.tasks.dissect.ties`). Equal IoUs go to the lower label
    number."""
    n_units = iou.shape[0]
    names = [label_names.get(label, str(label)) for label in labels]
    iou = iou.double().cpu()
    if not labels:
        empty = {
            "concept": None,
            "category": None,
            "score": 0.0,
            "top_concepts": [],
            "best_per_category": [],
            "interpretable": False,
            "tied_with": [],
        }
        frame = pd.DataFrame([{"unit": u, **empty} for u in range(n_units)])
        return frame.astype({"unit": "int32", "score": "float32"})
    # Stable sort over labels in ascending order, so equal IoUs keep the lower label first.
    order = torch.tensor(sorted(range(len(labels)), key=lambda j: labels[j]))
    ranked = torch.sort(iou[:, order], dim=1, descending=True, stable=True)
    ranked_index = order[ranked.indices]
    ranked_values = ranked.values
    per_category: dict[str, Tensor] = {}
    for category in dict.fromkeys(c for c in categories if c is not None):
        columns = torch.tensor([j for j in order.tolist() if categories[j] == category])
        best = iou[:, columns].max(dim=1)  # first maximum = lowest label among ties
        per_category[category] = torch.stack([columns[best.indices].double(), best.values], dim=1)
    ties = tied_concepts(iou, names, ranked_index[:, 0], tie_tolerance)
    rows = []
    for unit in range(n_units):
        top = ranked_index[unit, :top_k].tolist()
        scores = ranked_values[unit, :top_k].tolist()
        rows.append(
            {
                "unit": unit,
                "concept": names[top[0]],
                "category": categories[top[0]],
                "score": scores[0],
                "top_concepts": [{"concept": names[j], "score": v} for j, v in zip(top, scores)],
                "best_per_category": [
                    {"category": c, "concept": names[int(best[unit, 0])], "score": float(best[unit, 1])}
                    for c, best in per_category.items()
                ],
                "interpretable": scores[0] >= iou_threshold,
                "tied_with": ties[unit],
            }
        )
    return pd.DataFrame(rows).astype({"unit": "int32", "score": "float32"})


def _as_batch(item: object) -> DissectBatch:
    if isinstance(item, DissectBatch):
        return item
    return DissectBatch(*item)


def dissect_layers(
    batches_factory: Callable[[], Iterable[DissectBatch | tuple]],
    label_names: Mapping[int, str],
    label_categories: Mapping[int, str | Collection[str]] | None = None,
    *,
    thresholds: Mapping[str, Tensor] | None = None,
    quantile: float = DEFAULT_QUANTILE,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    bins: int = DEFAULT_BINS,
    threshold: str = "exact",
    categories: Collection[str] | None = None,
    seg_size: tuple[int, int] | None = None,
    top_k: int = 5,
    top_images: int = 10,
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE,
    device: str | torch.device = "cpu",
    permutations: int = 0,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Network Dissection of several layers sharing each pass over the probe set.

    Each batch's ``acts`` is ``{layer: Tensor[b, units, h, w]}`` (what
    :func:`xai_audit.tasks.dissect.activations.iter_spatial_activations` yields for one forward). ``batches_factory``
    is called once per pass: the threshold passes (none when ``thresholds`` holds every layer; one
    for ``threshold="histogram"``, usually two for ``"exact"``), then one for the tallies. Returns,
    per layer, one row per unit (see :func:`unit_labels`) plus ``threshold`` and ``top_images``
    (the images with the highest peak activation, when batches carry ids). With ``permutations``
    the tally pass also keeps what gives each unit's label a permutation ``p_value``
    (:class:`xai_audit.tasks.dissect.significance.ShuffledIntersections`, seeded by ``seed``).
    """
    if not 0 <= iou_threshold <= 1:
        raise ConfigError("iou_threshold", f"must be in [0, 1], got {iou_threshold}")
    if threshold not in THRESHOLD_METHODS:
        raise ConfigError("threshold", f"must be one of {', '.join(THRESHOLD_METHODS)}, got {threshold!r}")
    found = dict(thresholds or {})
    estimators: dict[str, UnitQuantile] = {}
    for item in batches_factory() if not found else ():
        for layer, acts in _as_batch(item).acts.items():
            estimators.setdefault(layer, UnitQuantile(quantile, bins)).update(acts)
    while threshold == "exact" and estimators:
        pending = {layer: e for layer, e in estimators.items() if e.passes < MAX_REFINE_PASSES and e.begin_pass()}
        if not pending:
            break
        for item in batches_factory():
            for layer, acts in _as_batch(item).acts.items():
                if layer in pending:
                    pending[layer].refine_update(acts)
        for estimator in pending.values():
            estimator.end_pass()
    for layer, estimator in estimators.items():
        found[layer] = (estimator.exact() if threshold == "exact" else estimator.estimate()[0]).float()
        if estimator.drifted:
            log.warning(
                "%s: the activations of %d unit(s) changed between passes over the probe set (a non-deterministic "
                "kernel?); their thresholds are approximate (within the last bracket), not exact",
                layer,
                estimator.drifted,
            )

    tallies = {
        layer: IoUTally(
            t,
            label_categories=label_categories,
            categories=categories,
            seg_size=seg_size,
            top_images=top_images,
            device=device,
        )
        for layer, t in found.items()
    }
    # the permutation test keeps what it needs from the same pass as the tallies (thresholds are known by now)
    shuffled = {layer: ShuffledIntersections(found[layer], categories) for layer in found} if permutations else {}
    for item in batches_factory():
        batch = _as_batch(item)
        for layer, acts in batch.acts.items():
            tallies[layer].update(acts, batch.masks, batch.image_labels, batch.image_ids)
            if shuffled:
                shuffled[layer].update(acts, batch.masks, batch.image_labels)
    results = {}
    for layer, tally in tallies.items():
        label_numbers, label_cats, iou, _, _ = tally.scores()
        frame = unit_labels(
            iou,
            label_numbers,
            label_cats,
            label_names,
            iou_threshold=iou_threshold,
            top_k=top_k,
            tie_tolerance=tie_tolerance,
        )
        frame["threshold"] = found[layer].float().cpu().numpy()
        frame["top_images"] = tally.top_images()
        if layer in shuffled:
            # unit_labels' best label: the first maximum over labels in ascending number order
            best = torch.tensor(label_numbers)[iou.cpu().argmax(dim=1)] if label_numbers else torch.zeros(len(frame))
            frame["p_value"] = shuffled[layer].p_values(best.long(), count=permutations, seed=seed)[0].numpy()
        results[layer] = frame
    return results


def dissect_layer(
    batches_factory: Callable[[], Iterable[DissectBatch | tuple]],
    label_names: Mapping[int, str],
    label_categories: Mapping[int, str | Collection[str]] | None = None,
    *,
    thresholds: Tensor | None = None,
    **options: object,
) -> pd.DataFrame:
    """:func:`dissect_layers` for one layer whose batches carry a plain ``acts`` tensor."""

    def single() -> Iterator[DissectBatch]:
        for item in batches_factory():
            batch = _as_batch(item)
            yield batch._replace(acts={"layer": batch.acts})

    given = {"layer": thresholds} if thresholds is not None else None
    return dissect_layers(single, label_names, label_categories, thresholds=given, **options)["layer"]
