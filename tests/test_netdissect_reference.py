"""Our Network Dissection against NetDissect-Lite's algorithm, re-implemented independently in
:mod:`benchmarks.netdissect_reference` from a reading of github.com/CSAILVision/NetDissect-Lite
(``feature_operation.py``: ``quantile_threshold``, ``tally_job``, ``tally``; ``util/vecquantile.py``;
``loader/data_loader.py``'s ``labelcat``), with the same per-image, per-unit loop and Pillow's bilinear
resize in place of ``scipy.misc.imresize(..., mode='F')``. Features in, labels out: with the same
thresholds the IoUs must agree exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import netdissect_reference as reference
from xai_audit.tasks.dissect import netdissect as nd

NAMES = {1: "disk", 2: "ground", 3: "rough", 4: "smooth", 5: "indoor", 6: "outdoor"}
CATEGORY = {1: "object", 2: "object", 3: "texture", 4: "texture", 5: "scene", 6: "scene"}
CATEGORIES = ["object", "texture", "scene"]
SIZE, LOW = 32, 8


def planted(n_images: int = 24, seed: int = 0, unlabelled: bool = False):
    """Images whose object and texture masks label every pixel (``unlabelled``: the texture mask
    leaves its right half 0), a scene per image, and native activations ``[n, 5, 8, 8]`` of units
    0 disk, 1 rough-texture, 2 indoor-scene detectors, 3 random, 4 constant."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE] + 0.5
    acts = np.zeros((n_images, 5, LOW, LOW), np.float32)
    batches = []
    for i in range(n_images):
        cy, cx = rng.uniform(6, SIZE - 6, 2)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(3, 6) ** 2
        rough = np.zeros((SIZE, SIZE), bool)
        rough[: rng.integers(4, SIZE - 4)] = True
        obj = np.where(disk, 1, 2)
        texture = np.where(rough, 3, 4)
        if unlabelled:
            texture[:, SIZE // 2 :] = 0
        indoor = bool(rng.random() < 0.4)

        def pooled(mask):
            return mask.reshape(LOW, SIZE // LOW, LOW, SIZE // LOW).mean(axis=(1, 3))

        acts[i, 0] = pooled(disk) + 0.05 * rng.random((LOW, LOW))
        acts[i, 1] = pooled(rough) * (0.5 + rng.random()) + 0.05 * rng.random((LOW, LOW))
        acts[i, 2] = (2.0 if indoor else 0.0) + 0.1 * rng.random((LOW, LOW))
        acts[i, 3] = rng.random((LOW, LOW))
        acts[i, 4] = 1.0
        batches.append(({"object": obj[None], "texture": texture[None]}, {"scene": [5 if indoor else 6]}))
    return acts, batches


def ours(acts: np.ndarray, batches, thresholds: torch.Tensor, batch_size: int = 5):
    tally = nd.IoUTally(thresholds, label_categories=CATEGORY, top_images=0)
    for start in range(0, len(batches), batch_size):
        chunk = batches[start : start + batch_size]
        tally.update(torch.from_numpy(acts[start : start + batch_size]), [m for m, _ in chunk], [s for _, s in chunk])
    return tally.scores()


def lite(acts: np.ndarray, batches, thresholds: np.ndarray) -> dict:
    maps = [{**masks, **scalars, "sh": SIZE, "sw": SIZE} for masks, scalars in batches]
    return reference.tally(acts.astype(np.float64), maps, thresholds, CATEGORIES, CATEGORY)


@pytest.fixture(scope="module")
def case():
    acts, batches = planted()
    thresholds = nd.unit_thresholds(lambda: [torch.from_numpy(acts)], quantile=0.05)
    return acts, batches, thresholds


def test_same_thresholds_give_the_reference_iou_and_labels(case):
    acts, batches, thresholds = case
    labels, _, iou, inter, union = ours(acts, batches, thresholds)
    ref = lite(acts, batches, thresholds.double().numpy())
    assert labels == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(inter.numpy(), ref["tally_both"][:, labels])
    # every pixel carries an object and a texture label, so NetDissect-Lite's union rule is ours
    np.testing.assert_allclose(iou.numpy(), ref["iou"][:, labels], rtol=1e-9, atol=0)
    np.testing.assert_allclose(iou.numpy(), reference.paper_iou(ref)[:, labels], rtol=1e-9, atol=0)
    assert ref["label"][:3].tolist() == [1, 3, 5]  # the planted detectors
    assert iou[0, 0] > 0.5  # the disk detector (rough texture and indoor scenes cover far more than 5 %)
    assert iou[4].max() == 0  # a constant unit is never strictly above its own threshold
    frame = nd.dissect_layer(
        lambda: [(torch.from_numpy(acts), [m for m, _ in batches], [s for _, s in batches])],
        NAMES,
        CATEGORY,
        thresholds=thresholds,
        quantile=0.05,
    )
    scored = ref["score"] > 0
    ref_names = [NAMES.get(label) for label in ref["label"].tolist()]
    assert [c for c, s in zip(frame["concept"], scored) if s] == [c for c, s in zip(ref_names, scored) if s]


def test_unlabelled_pixels_keep_counts_and_the_papers_iou_but_not_lites_union(case):
    """Where a category leaves pixels unlabelled, NetDissect-Lite counts a unit's area for it only
    in images where the unit's active pixels touch one of its labels: its IoU is then >= ours."""
    acts, batches, thresholds = case
    _, unlabelled = planted(unlabelled=True)
    labels, _, iou, inter, _ = ours(acts, unlabelled, thresholds)
    ref = lite(acts, unlabelled, thresholds.double().numpy())
    np.testing.assert_array_equal(inter.numpy(), ref["tally_both"][:, labels])
    np.testing.assert_allclose(iou.numpy(), reference.paper_iou(ref)[:, labels], rtol=1e-9, atol=0)
    texture = [labels.index(3), labels.index(4)]
    assert (ref["iou"][:, [3, 4]] >= iou.numpy()[:, texture] - 1e-12).all()
    assert (ref["iou"][:, [3, 4]] > iou.numpy()[:, texture] + 1e-3).any()


def test_reference_quantile_sketch_is_close_to_the_exact_order_statistic():
    """NetDissect-Lite's sketch reads the 994/999 point of its interpolated distribution: near,
    not at, our exact top-0.5 % order statistic."""
    rng = np.random.default_rng(1)
    features = rng.gamma(2.0, size=(40, 6, 16, 16)).astype(np.float32).astype(np.float64)
    sketch = reference.quantile_threshold(features)
    exact = nd.unit_thresholds(lambda: [torch.from_numpy(features).float()]).double().numpy()
    values = features.transpose(1, 0, 2, 3).reshape(6, -1)
    np.testing.assert_allclose(sketch, np.quantile(values, 994 / 999, axis=1), rtol=0.01)
    assert np.abs(sketch - exact).max() / exact.max() < 0.02
    assert ((values > exact[:, None]).sum(axis=1) <= np.ceil(0.005 * (values.shape[1] - 1))).all()
