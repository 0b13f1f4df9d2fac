"""Significance of neuron labels: permutation tests over probe images, and Benjamini–Hochberg.

A label is only worth reading if the unit's activations carry it: the null hypothesis of both
tests is that the unit's response is exchangeable across probe images (it does not depend on
which image it saw). Both shuffle the unit's responses across images with seeded random
permutations, recompute the labeller's own statistic, and report the Monte Carlo p-value
``(1 + #{null ≥ observed}) / (1 + R)`` (Phipson & Smyth 2010: never 0, exact level under the null).

- CLIP-Dissect: the unit's pooled activation column is permuted over images ``R`` times; the
  ``R + 1`` columns (observed first) go through the configured similarity function in ONE call,
  as if they were ``R + 1`` units. Each concept's scores are standardised by their mean and
  standard deviation over the shuffles, and the statistic is a column's largest standardised
  score over all concepts: the max-T procedure (Westfall & Young 1993), so the test accounts for
  the label being the best of many concepts. Standardising also removes any per-concept term
  shared by a call's columns — (soft-)WPMI's ``− λ·log p(c)``, a mean over the call's units —
  which a raw score would carry: with λ = 1 soft-WPMI's raw scores are capped at log(#units), and
  in one call a shuffle reaches that cap for some concept as surely as a perfect detector does.
- Network Dissection: the unit's thresholded maps are moved to other images
  (``A_j`` is scored against image ``σ(j)``'s mask), the statistic is the intersection with the
  unit's best label, ``Σ_j |A_j ∩ L_σ(j)|``. The unit's active area and the label's area do not
  change under a shuffle, so the IoU is a monotone function of the intersection and the test is
  a test of the IoU. It conditions on the chosen label (it does not redo the choice among labels
  under each shuffle: that would need every label's masks against every map).

A unit that responds the same to every image (a constant unit) is unchanged by any shuffle: its
p-value is exactly 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from xai_audit.tasks.core.errors import ConfigError

FDR = 0.05  # false discovery rate at which the summary counts significant labels (Benjamini–Hochberg)
# Relative slack when comparing a shuffle's statistic with the observed one: a shuffle that
# reproduces the observed value up to float round-off counts as reaching it (conservative).
RELATIVE_TOLERANCE = 1e-6
CALL_BUDGET_BYTES = 64 * 2**20  # shuffled activation columns per similarity call
PAIR_CHUNK = 512  # thresholded maps upsampled at once in the Network Dissection test


def permutations(n_images: int, count: int, seed: int) -> Tensor:
    """``count`` seeded random permutations of ``range(n_images)``, ``[count, n_images]`` (int64)."""
    if count < 1:
        raise ConfigError("dissect.significance.permutations", f"must be at least 1, got {count}")
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, n_images, generator=generator).argsort(dim=1)


def monte_carlo_p_values(observed: Tensor, null: Tensor) -> Tensor:
    """``(1 + #{null ≥ observed}) / (1 + R)`` per row: ``observed [u]``, ``null [u, R]`` → ``[u]`` float64."""
    observed, null = observed.double(), null.double()
    slack = RELATIVE_TOLERANCE * observed.abs().clamp_min(1e-12)
    reached = (null >= (observed - slack)[:, None]).sum(dim=1)
    return (1 + reached).double() / (1 + null.shape[1])


def benjamini_hochberg(p_values: Sequence[float] | np.ndarray, alpha: float) -> np.ndarray:
    """Which p-values are significant at false discovery rate ``alpha`` (Benjamini–Hochberg 1995,
    via scipy's ``false_discovery_control``); NaN p-values are never significant."""
    from scipy.stats import false_discovery_control

    values = np.asarray(p_values, dtype=float)
    significant = np.zeros(values.shape, dtype=bool)
    finite = np.isfinite(values)
    if finite.any():
        significant[finite] = false_discovery_control(values[finite], method="bh") <= alpha
    return significant


# --------------------------------------------------------------------------------------------
# CLIP-Dissect


def clip_dissect_p_values(
    similarity, clip_feats: Tensor, target_feats: Tensor, *, count: int, seed: int, **params: object
) -> Tensor:
    """Per unit, the max-T permutation p-value of its CLIP-Dissect scores (module docstring).

    ``similarity(clip_feats, columns, **params)`` is a registered similarity function;
    ``clip_feats`` ``[n_images, n_concepts]``, ``target_feats`` ``[n_images, n_units]``. The same
    seeded permutations serve every unit; several units' shuffles share one call (a term shared by
    a call's columns cancels in each unit's standardisation). Returns ``[n_units]`` float64.
    """
    n_images, n_units = target_feats.shape
    order = permutations(n_images, count, seed)
    order = torch.cat([torch.arange(n_images)[None], order])  # the observed column first
    step = max(1, CALL_BUDGET_BYTES // (4 * n_images * (count + 1)))
    p_values = torch.empty(n_units, dtype=torch.float64)
    for start in range(0, n_units, step):
        units = target_feats[:, start : start + step].float()
        # unit-major columns [n_images, u·(1 + count)], each column contiguous (topk over images is faster)
        columns = units[order].permute(2, 0, 1).reshape(-1, n_images).T
        call = similarity(clip_feats, columns, **params).double().view(units.shape[1], count + 1, -1)
        shuffles = call[:, 1:].nan_to_num(posinf=0, neginf=0)
        call = torch.where(torch.isfinite(call), call, shuffles.amin(dim=(1, 2), keepdim=True))
        spread, centre = torch.std_mean(call[:, 1:], dim=1, correction=0, keepdim=True)
        # a concept whose score no shuffle changes (a constant unit) carries no evidence: z = 0
        flat = spread <= 1e-9 * centre.abs().clamp_min(1.0)
        best = torch.where(flat, 0.0, (call - centre) / torch.where(flat, 1.0, spread)).amax(dim=2)
        p_values[start : start + step] = monte_carlo_p_values(best[:, 0], best[:, 1:])
    return p_values


# --------------------------------------------------------------------------------------------
# Network Dissection


class ShuffledIntersections:
    """The Network Dissection permutation test of one layer, fed by the IoU pass over the probe set.

    :meth:`update` keeps each image's label masks (int16/int32 at segmentation size) and, for
    every (image, unit) whose native map peaks above the unit's threshold, that native map (the
    others have no active pixel, as in :class:`xai_audit.tasks.dissect.netdissect.IoUTally`).
    :meth:`p_values` upsamples those maps to every image's mask size, thresholds them as the
    tally does (``up(a − T) > 0``) and counts ``M[j, i] = |A_j ∩ L_i|`` for the unit's label,
    over the images that hold it (the others add 0) and from the active pixels only.
    Memory: the probe set's masks plus the active units' native maps.
    """

    def __init__(self, thresholds: Tensor, categories: Sequence[str] | None = None) -> None:
        self.thresholds = thresholds.detach().float().cpu()
        self.categories = set(categories) if categories is not None else None
        self.masks: list[Tensor] = []  # per image [k, H, W]
        self.whole: list[set[int]] = []  # per image, its image-level labels
        self.present: list[set[int]] = []  # per image, the labels of its pixel masks
        self._pairs: list[tuple[Tensor, Tensor, Tensor]] = []  # (image index, unit, native map)

    def update(
        self,
        acts: Tensor,
        masks: Sequence[Mapping[str, np.ndarray]],
        image_labels: Sequence[Mapping[str, Sequence[int]]] | None = None,
    ) -> None:
        """Add one batch (the layer's ``[b, units, h, w]`` activations and the images' labels)."""
        acts = acts.detach().float().cpu()
        start = len(self.masks)
        for i in range(acts.shape[0]):
            stack = [
                np.asarray(array).reshape(-1, *np.shape(array)[-2:])
                for category, array in masks[i].items()
                if self.categories is None or category in self.categories
            ]
            mask = np.concatenate(stack) if stack else np.zeros((1, *acts.shape[-2:]), dtype=np.int64)
            self.masks.append(torch.from_numpy(mask.astype(np.int16 if mask.max() < 2**15 else np.int32)))
            self.present.append({int(label) for label in np.unique(mask) if label > 0})
            labels = (image_labels or [{}] * acts.shape[0])[i]
            self.whole.append(
                {
                    int(label)
                    for category, values in labels.items()
                    if self.categories is None or category in self.categories
                    for label in values
                    if int(label) > 0
                }
            )
        image, unit = (acts.amax(dim=(2, 3)) > self.thresholds[None, :]).nonzero(as_tuple=True)
        self._pairs.append((image + start, unit, acts[image, unit]))

    def _label_masks(self, label: int, stack: Tensor, members: list[int]) -> tuple[Tensor, Tensor]:
        """``(columns, masks)``: the member images that hold ``label`` (image numbers) and
        ``[H·W, len(columns)]`` float32, where it lies in each (``stack`` holds the members' masks,
        ``[members, k, H, W]``). Images without it would add 0 to every count and are left out."""
        rows = [pos for pos, i in enumerate(members) if label in self.present[i] or label in self.whole[i]]
        where = (stack[rows] == label).any(dim=1).flatten(1).float()
        whole = torch.tensor([label in self.whole[members[pos]] for pos in rows], dtype=torch.bool)
        where[whole] = 1.0
        return torch.tensor(members, dtype=torch.int64)[rows], where.T.contiguous()

    def _stack(self, members: list[int]) -> Tensor:
        """The members' masks as one ``[members, k, H, W]`` tensor (fewer layers padded with 0)."""
        depth = max(self.masks[i].shape[0] for i in members)
        return torch.stack([F.pad(self.masks[i], (0, 0, 0, 0, 0, depth - self.masks[i].shape[0])) for i in members])

    def p_values(self, best_labels: Tensor, *, count: int, seed: int) -> tuple[Tensor, Tensor]:
        """``(p_values [units] float64, observed intersections [units] int64)`` of each unit with
        its label ``best_labels[u]`` (a label number; ≤ 0 for a unit without one: p-value NaN)."""
        n_images, n_units = len(self.masks), self.thresholds.shape[0]
        p_values = torch.full((n_units,), float("nan"), dtype=torch.float64)
        observed = torch.zeros(n_units, dtype=torch.int64)
        if n_images == 0:
            return p_values, observed
        image = torch.cat([pair[0] for pair in self._pairs])
        unit = torch.cat([pair[1] for pair in self._pairs])
        maps = torch.cat([pair[2] for pair in self._pairs]) if image.numel() else torch.zeros(0, 1, 1)
        sizes: dict[tuple[int, int], list[int]] = {}
        for i, mask in enumerate(self.masks):
            sizes.setdefault(tuple(mask.shape[-2:]), []).append(i)
        stacks = {size: (members, self._stack(members)) for size, members in sizes.items()}
        order = permutations(n_images, count, seed)
        labelled = best_labels > 0
        p_values[labelled] = 1.0  # a labelled unit never active anywhere: no shuffle can do worse
        for label in torch.unique(best_labels[labelled]).tolist():
            units = torch.nonzero(best_labels == label).flatten()
            chosen = torch.isin(unit, units).nonzero().flatten()
            if chosen.numel() == 0:
                continue
            counts = torch.zeros(chosen.numel(), n_images)  # M[pair, image]
            for size, (members, stack) in stacks.items():
                columns, label_masks = self._label_masks(int(label), stack, members)
                if columns.numel() == 0:
                    continue
                for start in range(0, chosen.numel(), PAIR_CHUNK):
                    pairs = chosen[start : start + PAIR_CHUNK]
                    shifted = maps[pairs][:, None] - self.thresholds[unit[pairs], None, None, None]
                    active = F.interpolate(shifted, size=size, mode="bilinear", align_corners=False) > 0
                    # ~1 % of a thresholded map's pixels are active: sum the label rows of those
                    # pixels (exact integer counts in float32) instead of a dense [pairs, H·W] product
                    pair, pixel = active.flatten(1).nonzero(as_tuple=True)
                    block = torch.zeros(pairs.numel(), columns.numel()).index_add_(0, pair, label_masks[pixel])
                    counts[start : start + pairs.numel(), columns] = block
            pair_unit, pair_image = unit[chosen], image[chosen]
            for u in units.tolist():
                rows = torch.nonzero(pair_unit == u).flatten()
                if rows.numel() == 0:
                    continue
                own = counts[rows, pair_image[rows]].sum()
                shuffled = counts[rows[None, :], order[:, pair_image[rows]]].sum(dim=1)  # [count]
                observed[u] = int(own.round())
                p_values[u] = monte_carlo_p_values(own[None], shuffled[None])[0]
        return p_values, observed
