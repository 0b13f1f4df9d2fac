"""Network Dissection as NetDissect-Lite computes it: an independent reference for our pipeline.

Written for this project from a reading of github.com/CSAILVision/NetDissect-Lite (commit
2163454e, 2019-05-06); none of its code is imported. It follows, in the same loop structure:

* ``util/vecquantile.py::QuantileVector`` (the whole class as used: ``add`` → ``_add_every``,
  ``_shift``, ``_expand``, ``_next_capacity``, ``_scan_extremes``/``_update_extremes``,
  ``_weighted_summary``, ``quantiles``, ``readout``) → :class:`QuantileVector`, the streaming
  KLL-style sketch (default ``resolution=24*1024``, ``buffersize=128``, seeded ``RandomState``).
* ``feature_operation.py::FeatureOperator.quantile_threshold`` → :func:`quantile_threshold`:
  batches of 64 images, ``transpose(0, 2, 3, 1).reshape(-1, units)``, ``QuantileVector(depth=units,
  seed=1)``, threshold ``readout(1000)[:, int(1000 * (1 - QUANTILE) - 1)]`` with ``QUANTILE = 0.005``
  (``settings.py``). That reads the 994/999 = 0.994995 point of the sketch's interpolated
  distribution: approximate, and not the exact ``1 - q`` order statistic our pipeline uses.
* ``feature_operation.py::FeatureOperator.tally_job`` → :func:`tally_job`: per image, bincount the
  pixel labels (label 0 zeroed) into ``tally_labels`` and add ``sh * sw`` for each image-level
  (scalar) label; per unit whose native map's max exceeds its threshold, upsample the map with
  ``scipy.misc.imresize(feature_map, (sh, sw), mode='F')`` (bilinear), take the pixels strictly above
  the threshold, add their count to ``tally_units``, bincount the labels under them into
  ``tally_both`` and, per category, to ``tally_cat``; scalar labels add the whole active area; the
  active area goes to ``tally_units_cat[unit, c]`` for every category ``c`` the active pixels touch
  (or the image's scalar labels name).
* ``feature_operation.py::FeatureOperator.tally`` (after the jobs) → :func:`tally`:
  ``tally_units_cat @ labelcat.T``; ``iou = tally_both / (tally_units_cat + tally_labels - tally_both
  + 1e-10)``; per category the best label (``argmax``), per unit the best category.
* ``loader/data_loader.py::SegmentationData.labelcat`` → :func:`label_categories`: one-hot of each
  label's primary category.

Deviations, all without effect on the numbers:

* ``scipy.misc.imresize`` was removed from SciPy (1.3). With ``mode='F'`` it built a float32 PIL
  image and called ``Image.resize((sw, sh), BILINEAR)``; :func:`upsample` calls Pillow exactly so.
* Features are in-memory arrays (the reference memory-maps them); one tally job (its default
  ``PARALLEL = 1``); no CSV, no progress printing, no prefetcher threads (concept maps come as a list).
* ``QuantileVector.add``'s subsampling branch (reached only when the sketch's ~24 levels are full,
  i.e. far beyond 2**24 values per unit) is not written: :meth:`QuantileVector.add` raises there.
  The reference's ``numpy.ceil[...]`` in that branch would raise too.
* ``tally_cat`` starts at zeros for each active unit: the reference assigns it only inside ``if
  len(pixels) > 0``, so an image with no pixel labels would reuse a stale value (or fail).
* A category an image does not annotate is absent from its concept map and skipped (the reference's
  prefetcher yields an empty list for it, which adds nothing either).

Our pipeline differs from this in one rule, which the benchmark reports rather than hides: our
union counts a unit's active area over the images that *annotate* a label's category
(``xai_audit.tasks.dissect.netdissect.IoUTally``); NetDissect-Lite counts it over the images where the unit's
*active pixels touch* some label of that category (``tally_units_cat``). On a probe set where every
pixel category labels every pixel the two agree; elsewhere the reference's IoU is the larger.
:func:`tally` therefore also returns ``tally_units`` (every image's area), from which the paper's
formula (Bau et al. 2017, Eq. 1: sums over all images) is ``tally_both / (tally_units + tally_labels
- tally_both)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

QUANTILE = 0.005  # settings.QUANTILE
QUANTILE_BATCH = 64  # quantile_threshold's batch_size


class QuantileVector:
    """Streaming per-column quantiles (NetDissect-Lite's ``util/vecquantile.py``, KLL-style sketch)."""

    def __init__(self, depth: int = 1, resolution: int = 24 * 1024, buffersize: int | None = None, seed=None):
        self.resolution = resolution
        self.depth = depth
        if buffersize is None:
            buffersize = min(128, (resolution + 7) // 8)
        self.buffersize = buffersize
        self.samplerate = 1.0
        self.data = [np.zeros(shape=(depth, resolution))]
        self.firstfree = [0]
        self.random = np.random.RandomState(seed)
        self.extremes = np.full((depth, 2), np.nan)
        self.size = 0

    def add(self, incoming: np.ndarray) -> None:
        if incoming.ndim != 2 or incoming.shape[1] != self.depth:
            raise ValueError(f"expected [n, {self.depth}], got {incoming.shape}")
        self.size += incoming.shape[0]
        if self.samplerate < 1.0:
            raise NotImplementedError("the reference's subsampling branch (beyond ~2**24 values per column)")
        self._add_every(incoming)

    def _add_every(self, incoming: np.ndarray) -> None:
        supplied = len(incoming)
        index = 0
        while index < supplied:
            ff = self.firstfree[0]
            available = self.data[0].shape[1] - ff
            if available == 0:
                if not self._shift():
                    raise NotImplementedError("the reference's subsampling branch")
                ff = self.firstfree[0]
                available = self.data[0].shape[1] - ff
            copycount = min(available, supplied - index)
            self.data[0][:, ff : ff + copycount] = np.transpose(incoming[index : index + copycount, :])
            self.firstfree[0] += copycount
            index += copycount

    def _shift(self) -> bool:
        index = 0
        # Shift up while the level has less room than half the previous level's size.
        while self.data[index].shape[1] - self.firstfree[index] < (
            -(-self.data[index - 1].shape[1] // 2) if index else 1
        ):
            if index + 1 >= len(self.data):
                return self._expand()
            data = self.data[index][:, 0 : self.firstfree[index]]
            data.sort()
            if index == 0 and self.samplerate >= 1.0:
                self._update_extremes(data[:, 0], data[:, -1])
            offset = self.random.binomial(1, 0.5)
            position = self.firstfree[index + 1]
            subset = data[:, offset::2]
            self.data[index + 1][:, position : position + subset.shape[1]] = subset
            self.firstfree[index] = 0
            self.firstfree[index + 1] += subset.shape[1]
            index += 1
        return True

    def _scan_extremes(self, incoming: np.ndarray) -> None:
        self._update_extremes(np.nanmin(incoming, axis=0), np.nanmax(incoming, axis=0))

    def _update_extremes(self, minr: np.ndarray, maxr: np.ndarray) -> None:
        self.extremes[:, 0] = np.nanmin([self.extremes[:, 0], minr], axis=0)
        self.extremes[:, -1] = np.nanmax([self.extremes[:, -1], maxr], axis=0)

    def _expand(self) -> bool:
        cap = self._next_capacity()
        if cap > 0:
            self.data.insert(0, np.empty(shape=(self.depth, cap), dtype=self.data[-1].dtype))
            self.firstfree.insert(0, 0)
        else:
            self.samplerate *= 0.5
        for index in range(1, len(self.data)):
            amount = self.firstfree[index]
            if amount == 0:
                continue
            position = self.firstfree[index - 1]
            # Move data down a level if that leaves room for half the level above's buffer.
            if self.data[index - 1].shape[1] - (amount + position) >= (
                -(-self.data[index - 2].shape[1] // 2) if (index - 1) else 1
            ):
                self.data[index - 1][:, position : position + amount] = self.data[index][:, :amount]
                self.firstfree[index - 1] += amount
                self.firstfree[index] = 0
            else:
                data = self.data[index][:, :amount]
                data.sort()
                if index == 1:
                    self._update_extremes(data[:, 0], data[:, -1])
                offset = self.random.binomial(1, 0.5)
                scrunched = data[:, offset::2]
                self.data[index][:, : scrunched.shape[1]] = scrunched
                self.firstfree[index] = scrunched.shape[1]
        return cap > 0

    def _next_capacity(self) -> int:
        cap = np.ceil(self.resolution * np.power(0.67, len(self.data)))
        if cap < 2:
            return 0
        return max(self.buffersize, int(cap))

    def _weighted_summary(self) -> tuple[np.ndarray, np.ndarray]:
        if self.firstfree[0]:
            self._scan_extremes(self.data[0][:, : self.firstfree[0]].transpose())
        size = sum(self.firstfree) + 2
        weights = np.empty(shape=(size), dtype="float32")
        summary = np.empty(shape=(self.depth, size), dtype=self.data[-1].dtype)
        weights[0:2] = 0
        summary[:, 0:2] = self.extremes
        index = 2
        for level, ff in enumerate(self.firstfree):
            if ff == 0:
                continue
            summary[:, index : index + ff] = self.data[level][:, :ff]
            weights[index : index + ff] = np.power(2.0, level)
            index += ff
        order = np.argsort(summary)
        summary = summary[np.arange(self.depth)[:, None], order]
        weights = weights[order]
        return summary, weights

    def quantiles(self, quantiles: np.ndarray, old_style: bool = False) -> np.ndarray:
        if self.size == 0:
            return np.full((self.depth, len(quantiles)), np.nan)
        summary, weights = self._weighted_summary()
        cumweights = np.cumsum(weights, axis=-1) - weights / 2
        if old_style:
            cumweights -= cumweights[:, 0:1]
            cumweights /= cumweights[:, -1:]
        else:
            cumweights /= np.sum(weights, axis=-1, keepdims=True)
        result = np.empty(shape=(self.depth, len(quantiles)))
        for d in range(self.depth):
            result[d] = np.interp(quantiles, cumweights[d], summary[d])
        return result

    def readout(self, count: int, old_style: bool = True) -> np.ndarray:
        return self.quantiles(np.linspace(0.0, 1.0, count), old_style=old_style)


def quantile_threshold(features: np.ndarray, quantile: float = QUANTILE) -> np.ndarray:
    """Per-unit thresholds ``[units]`` of ``features`` ``[images, units, h, w]`` (``quantile_threshold``)."""
    quant = QuantileVector(depth=features.shape[1], seed=1)
    for i in range(0, features.shape[0], QUANTILE_BATCH):
        batch = features[i : i + QUANTILE_BATCH]
        batch = np.transpose(batch, axes=(0, 2, 3, 1)).reshape(-1, features.shape[1])
        quant.add(batch)
    return quant.readout(1000)[:, int(1000 * (1 - quantile) - 1)]


def upsample(feature_map: np.ndarray, sh: int, sw: int) -> np.ndarray:
    """``scipy.misc.imresize(feature_map, (sh, sw), mode='F')``: a float32 PIL image resized bilinearly."""
    image = Image.fromarray(np.asarray(feature_map, dtype=np.float32), mode="F")
    return np.asarray(image.resize((sw, sh), resample=Image.BILINEAR))


def label_categories(label_category: Mapping[int, str], categories: Sequence[str], n_labels: int) -> np.ndarray:
    """``labelcat`` ``[labels, categories]``: one-hot of each label's (primary) category; label 0 none."""
    labelcat = np.zeros((n_labels, len(categories)))
    for label, category in label_category.items():
        if 0 < label < n_labels and category in categories:
            labelcat[label, categories.index(category)] = 1
    return labelcat


def tally_job(
    features: np.ndarray,
    concept_maps: Sequence[Mapping[str, object]],
    threshold: np.ndarray,
    categories: Sequence[str],
    labelcat: np.ndarray,
    tally_labels: np.ndarray,
    tally_units: np.ndarray,
    tally_units_cat: np.ndarray,
    tally_both: np.ndarray,
) -> None:
    """``FeatureOperator.tally_job`` over every image: accumulates into the four tally arrays.

    ``concept_maps[i]`` holds ``sh``, ``sw`` and, per category, an int label array ``[H, W]`` or
    ``[k, H, W]`` (pixel labels) or a list of label numbers (image-level labels), as the
    reference's ``SegmentationPrefetcher`` yields them; ``features[i]`` is image i's ``[units, h, w]``.
    """
    units = features.shape[1]
    for img_index, concept_map in enumerate(concept_maps):
        scalars, pixels = [], []
        for cat in categories:
            if cat not in concept_map:
                continue
            label_group = concept_map[cat]
            shape = np.shape(label_group)
            if len(shape) % 2 == 0:
                label_group = [label_group]
            if len(shape) < 2:
                scalars += label_group
            else:
                pixels.append(label_group)
        for scalar in scalars:
            tally_labels[scalar] += concept_map["sh"] * concept_map["sw"]
        if pixels:
            pixels = np.concatenate(pixels)
            tally_label = np.bincount(pixels.ravel())
            if len(tally_label) > 0:
                tally_label[0] = 0
            tally_labels[: len(tally_label)] += tally_label

        for unit_id in range(units):
            feature_map = features[img_index][unit_id]
            if feature_map.max() > threshold[unit_id]:
                mask = upsample(feature_map, concept_map["sh"], concept_map["sw"])
                indexes = np.argwhere(mask > threshold[unit_id])

                tally_units[unit_id] += len(indexes)
                tally_cat = np.zeros(len(categories))
                if len(pixels) > 0:
                    tally_bt = np.bincount(pixels[:, indexes[:, 0], indexes[:, 1]].ravel())
                    if len(tally_bt) > 0:
                        tally_bt[0] = 0
                    tally_cat = np.dot(tally_bt[None, :], labelcat[: len(tally_bt), :])[0]
                    tally_both[unit_id, : len(tally_bt)] += tally_bt
                for scalar in scalars:
                    tally_cat += labelcat[scalar]
                    tally_both[unit_id, scalar] += len(indexes)
                tally_units_cat[unit_id] += len(indexes) * (tally_cat > 0)


def tally(
    features: np.ndarray,
    concept_maps: Sequence[Mapping[str, object]],
    threshold: np.ndarray,
    categories: Sequence[str],
    label_category: Mapping[int, str],
) -> dict[str, np.ndarray]:
    """``FeatureOperator.tally``: the tallies, the reference's IoU ``[units, labels]`` and its labels.

    Returns ``tally_both``, ``tally_units``, ``tally_units_cat`` (per label, after ``@ labelcat.T``),
    ``tally_labels``, ``iou`` (the reference's), ``label`` (per unit: the best category's best label,
    as the reference's ``bestcat_pciou[0]`` / ``label_pciou`` pick it) and ``score`` (its IoU).
    """
    categories = list(categories)
    n_labels = max(label_category) + 1
    units = features.shape[1]
    labelcat = label_categories(label_category, categories, n_labels)
    tally_both = np.zeros((units, n_labels), dtype=np.float64)
    tally_units = np.zeros(units, dtype=np.float64)
    tally_units_cat = np.zeros((units, len(categories)), dtype=np.float64)
    tally_labels = np.zeros(n_labels, dtype=np.float64)
    tally_job(
        features, concept_maps, threshold, categories, labelcat, tally_labels, tally_units, tally_units_cat, tally_both
    )

    primary_categories = labelcat.argmax(axis=1)
    tally_units_cat = np.dot(tally_units_cat, labelcat.T)
    iou = tally_both / (tally_units_cat + tally_labels[np.newaxis, :] - tally_both + 1e-10)
    pciou = np.array(
        [iou * (primary_categories[np.arange(iou.shape[1])] == ci)[np.newaxis, :] for ci in range(len(categories))]
    )
    label_pciou = pciou.argmax(axis=2)
    score_pciou = pciou[np.arange(pciou.shape[0])[:, np.newaxis], np.arange(pciou.shape[1])[np.newaxis, :], label_pciou]
    bestcat_pciou = score_pciou.argsort(axis=0)[::-1]
    best = bestcat_pciou[0]
    return {
        "tally_both": tally_both,
        "tally_units": tally_units,
        "tally_units_cat": tally_units_cat,
        "tally_labels": tally_labels,
        "iou": iou,
        "label": label_pciou[best, np.arange(units)],
        "score": score_pciou[best, np.arange(units)],
    }


def paper_iou(result: Mapping[str, np.ndarray]) -> np.ndarray:
    """The paper's IoU (sums over all images) from the reference's own tallies, ``[units, labels]``."""
    union = result["tally_units"][:, None] + result["tally_labels"][None, :] - result["tally_both"]
    return result["tally_both"] / np.maximum(union, 1)
