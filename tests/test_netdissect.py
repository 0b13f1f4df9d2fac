"""Network Dissection: planted detectors, the streaming tally against the plain computation, the
threshold estimator's error bound, and memory that does not grow with the probe set."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xai_audit.tasks.core.errors import ConfigError
from xai_audit.tasks.dissect import netdissect as nd

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small tensors on a shared 2-core machine run several times faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Labels of the planted world: pixel labels 1-3, image-level scenes 4-5, a two-layer "part" 6-7.
NAMES = {1: "disk", 2: "square", 3: "stripes", 4: "indoor", 5: "outdoor", 6: "wheel", 7: "door"}
CATEGORY = {1: "object", 2: "color", 3: "texture", 4: "scene", 5: "scene", 6: "part", 7: "part"}


def _disk(size: int, rng: np.random.Generator, radius: float) -> np.ndarray:
    cy, cx = rng.uniform(radius, size - radius, 2)
    yy, xx = np.mgrid[:size, :size] + 0.5
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def planted_probe(n_images: int, seed: int, size: int = 32, factor: int = 4, quantile: float = 0.02):
    """Images with sparse labels and the activations [n, 6, size/factor, size/factor] of units
    0 disk, 1 square, 2 stripes, 3 indoor-scene detectors, 4 constant, 5 random.

    Each planted label covers about ``quantile`` of all probe pixels, so a detector's top-quantile
    region can match it: IoU is high only when thresholds and upsampling are right.
    """
    rng = np.random.default_rng(seed)
    low = size // factor
    masks, labels, acts = [], [], np.zeros((n_images, 6, low, low), np.float32)
    for i in range(n_images):
        disk = _disk(size, rng, 6.5) if rng.random() < 0.16 else np.zeros((size, size), bool)
        square = np.zeros((size, size), bool)
        if rng.random() < 0.16:
            y, x = rng.integers(0, size - 12, 2)
            square[y : y + 12, x : x + 12] = True
        stripes = np.zeros((size, size), bool)
        if rng.random() < 0.08:
            y = rng.integers(0, size - 8)
            stripes[y : y + 8] = True  # a full-width band (a quarter of the image)
        scene = 4 if rng.random() < 0.02 else 5
        masks.append(
            {
                "object": (disk * 1)[None].astype(np.int32),
                "color": (square * 2)[None].astype(np.int32),
                "texture": (stripes * 3)[None].astype(np.int32),
            }
        )
        labels.append({"scene": [scene]})
        for unit, region in enumerate((disk, square, stripes)):
            coverage = region.reshape(low, factor, low, factor).mean(axis=(1, 3))
            acts[i, unit] = coverage * rng.uniform(0.8, 1.2)
        acts[i, 3] = float(scene == 4) * rng.uniform(0.8, 1.2)
    acts[:, :4] += 0.03 * rng.standard_normal(acts[:, :4].shape).astype(np.float32)
    acts[:, 4] = 1.0
    acts[:, 5] = rng.standard_normal(acts[:, 5].shape)
    ids = [f"img{i:04d}.png" for i in range(n_images)]
    return torch.from_numpy(acts), masks, labels, ids


def batches_of(acts, masks, labels, ids, size: int):
    def factory():
        for start in range(0, len(ids), size):
            end = start + size
            yield nd.DissectBatch(acts[start:end], masks[start:end], labels[start:end], ids[start:end])

    return factory


def exact_thresholds(acts: torch.Tensor, quantile: float) -> torch.Tensor:
    values = acts.transpose(0, 1).reshape(acts.shape[1], -1).double()
    return torch.quantile(values, 1 - quantile, dim=1, interpolation="lower")


def plain_iou(acts, masks, labels, thresholds, label_categories=None):
    """The definition, one image at a time: upsample, threshold, intersect with each label's mask
    (image-level labels cover the whole image). With ``label_categories``, an image counts
    towards a label's union only when it annotates the label's category."""
    universe = sorted(
        {int(v) for m in masks for a in m.values() for v in np.unique(a) if v > 0}
        | {v for lab in labels for vs in lab.values() for v in vs}
    )
    inter = {label: torch.zeros(acts.shape[1], dtype=torch.int64) for label in universe}
    union = {label: torch.zeros(acts.shape[1], dtype=torch.int64) for label in universe}
    for i in range(acts.shape[0]):
        height, width = next(iter(masks[i].values())).shape[-2:]
        up = F.interpolate(acts[i : i + 1].float(), size=(height, width), mode="bilinear", align_corners=False)[0]
        active = up > thresholds.float()[:, None, None]
        annotated = set(masks[i]) | set(labels[i])
        for label in universe:
            if label_categories is not None and label_categories[label] not in annotated:
                continue
            region = np.zeros((height, width), bool)
            for array in masks[i].values():
                region |= (np.asarray(array) == label).any(axis=0)
            if any(label in vs for vs in labels[i].values()):
                region[:] = True
            region = torch.from_numpy(region)
            inter[label] += (active & region).sum(dim=(1, 2))
            union[label] += (active | region).sum(dim=(1, 2))
    return inter, union


def test_planted_detectors_get_their_label_and_constant_unit_does_not():
    acts, masks, labels, ids = planted_probe(400, seed=0)
    frame = nd.dissect_layer(batches_of(acts, masks, labels, ids, 32), NAMES, CATEGORY, quantile=0.02)
    by_unit = frame.set_index("unit")
    for unit, concept, category in [
        (0, "disk", "object"),
        (1, "square", "color"),
        (2, "stripes", "texture"),
        (3, "indoor", "scene"),
    ]:
        assert by_unit.concept[unit] == concept and by_unit.category[unit] == category
        assert by_unit.score[unit] >= 0.5, (unit, by_unit.score[unit])
        assert by_unit.interpretable[unit]
    assert by_unit.score[4] < 0.04 and not by_unit.interpretable[4]
    assert by_unit.score[5] < 0.1  # the random unit matches nothing well
    scene_images = {i for i, lab in zip(ids, labels) if lab["scene"] == [4]}
    assert len(by_unit.top_images[3]) == 10 and set(by_unit.top_images[3]) <= scene_images
    best = {d["category"]: d["concept"] for d in by_unit.best_per_category[0]}
    assert best["object"] == "disk" and set(best) == {"object", "color", "texture", "scene"}
    assert [d["concept"] for d in by_unit.top_concepts[0]][0] == "disk" and len(by_unit.top_concepts[0]) == 5


def _mixed_probe(seed: int):
    """Planted data plus Broden quirks: a two-layer part category with overlapping and repeated
    labels, images of another segmentation size, and images that annotate only some categories."""
    acts, masks, labels, ids = planted_probe(60, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for i in range(0, 60, 3):
        part = np.zeros((2, 32, 32), np.int32)
        part[0, :16] = 6
        part[1, 8:24] = rng.choice([6, 7])  # overlaps layer 0; sometimes the same label twice
        masks[i] = {**masks[i], "part": part}
    for i in range(1, 60, 7):
        masks[i] = {"texture": masks[i]["texture"]}  # annotates texture (+ scene) only
    for i in range(2, 60, 5):
        masks[i] = {k: np.kron(v, np.ones((1, 2, 2), np.int32)) for k, v in masks[i].items()}  # 64 × 64
    return acts, masks, labels, ids


@pytest.mark.parametrize("restrict", [False, True])
def test_streaming_tally_equals_the_plain_computation(monkeypatch, restrict):
    acts, masks, labels, ids = _mixed_probe(seed=3)
    thresholds = exact_thresholds(acts, 0.02)
    monkeypatch.setattr(nd, "CHUNK_BUDGET_BYTES", 6 * 32 * 32 * 9)  # chunks of 6 maps (1 at 64 px)
    tally = nd.IoUTally(thresholds, label_categories=CATEGORY if restrict else None)
    for start, stop in [(0, 7), (7, 8), (8, 31), (31, 60)]:
        tally.update(acts[start:stop], masks[start:stop], labels[start:stop], ids[start:stop])
    table = tally.result().set_index(["unit", "label"])
    inter, union = plain_iou(acts, masks, labels, thresholds, CATEGORY if restrict else None)
    assert sorted(table.index.get_level_values("label").unique()) == sorted(inter)
    for label in inter:
        for unit in range(acts.shape[1]):
            row = table.loc[(unit, label)]
            assert row.intersection == inter[label][unit] and row.union == union[label][unit], (unit, label)
            assert row.iou == pytest.approx(inter[label][unit].item() / max(1, union[label][unit].item()))
            assert row.category == CATEGORY[label]


def _hard_batches(seed: int):
    """Heavy-tailed activations whose range keeps growing (both ends), so the histogram merges."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(12):
        x = torch.relu(torch.randn(5, 9, 6, 6, generator=g)) * (1 + b)
        x[:, 1] -= 3.0 * b  # a unit that drifts downwards
        x[:, 2] = torch.distributions.Exponential(0.5).sample((5, 6, 6))  # heavy tail
        x[:, 3] = 0.0 if b < 4 else x[:, 3]  # flat start
        x[:, 4] = 2.5  # constant
        out.append(x)
    return out


@pytest.mark.parametrize("bins", [16, 256, 2048])
@pytest.mark.parametrize("quantile", [0.005, 0.05])
def test_threshold_estimate_is_within_its_documented_bound(bins, quantile):
    batches = _hard_batches(seed=bins)
    estimator = nd.UnitQuantile(quantile, bins)
    for x in batches:
        estimator.update(x)
    everything = torch.cat(batches)
    exact = exact_thresholds(everything, quantile)
    values = everything.transpose(0, 1).reshape(9, -1).double()
    span = values.amax(dim=1) - values.amin(dim=1)
    estimate, bound = estimator.estimate()
    assert ((estimate - exact).abs() <= bound + 1e-12).all()
    spread = span > 0
    assert (bound[spread] <= 2 * span[spread] / (bins - 1)).all()  # the documented bound
    assert (bound[~spread] <= 1e-6).all()
    refined = estimator.refine(lambda: iter(batches))
    assert torch.equal(refined, exact)  # the order statistic itself, not an estimate of it
    assert 1 <= estimator.passes <= 3 and estimator.drifted == 0


def test_estimated_thresholds_change_iou_only_within_the_quantile_error():
    acts, masks, labels, ids = planted_probe(120, seed=5)
    factory = batches_of(acts, masks, labels, ids, 16)
    exact = exact_thresholds(acts, 0.02)
    estimator = nd.UnitQuantile(0.02, bins=64)  # coarse on purpose
    for batch in factory():
        estimator.update(batch.acts)
    estimate, bound = estimator.estimate()
    results = {}
    for name, thresholds in (("exact", exact), ("estimate", estimate)):
        tally = nd.IoUTally(thresholds, label_categories=CATEGORY)
        for batch in factory():
            tally.update(*batch)
        results[name] = tally.result().set_index(["unit", "label"])
    # Pixels whose upsampled value lies within the bound of the exact threshold are the only ones
    # that can switch sides; each changes an intersection or a union by at most one.
    up = F.interpolate(acts, size=(32, 32), mode="bilinear", align_corners=False)
    lo, hi = (exact - bound).float()[None, :, None, None], (exact + bound).float()[None, :, None, None]
    band = ((up > lo) & (up <= hi)).sum(dim=(0, 2, 3))
    exact_r, est_r = results["exact"], results["estimate"]
    for unit in range(acts.shape[1]):
        for label in exact_r.index.get_level_values("label").unique():
            a, b = exact_r.loc[(unit, label)], est_r.loc[(unit, label)]
            assert abs(int(a.intersection) - int(b.intersection)) <= band[unit]
            assert abs(int(a.union) - int(b.union)) <= band[unit]


def test_categories_option_restricts_the_labels_scored():
    acts, masks, labels, ids = planted_probe(80, seed=1)
    frame = nd.dissect_layer(
        batches_of(acts, masks, labels, ids, 40), NAMES, CATEGORY, quantile=0.02, categories=["object", "scene"]
    )
    concepts = {d["concept"] for row in frame.top_concepts for d in row}
    assert concepts <= {"disk", "indoor", "outdoor"}


def test_exact_thresholds_are_the_order_statistic_even_among_ties():
    """8-bit-like activations (steps of 1/255) tie by the thousand; the exact threshold is the
    order statistic itself, so values tied with it stay inactive and at most ⌈q(N − 1)⌉ of each
    unit's values lie strictly above it. The one-pass histogram lands inside the tied group's bin
    and, for some units, below the group: more than that share becomes active."""
    acts, masks, labels, ids = planted_probe(64, seed=2)
    quantised = (acts.clamp(0, 1) * 255).round() / 255
    factory = batches_of(quantised, masks, labels, ids, 10)
    exact = nd.unit_thresholds(lambda: (b.acts for b in factory()), 0.02)
    assert torch.equal(exact.double(), exact_thresholds(quantised, 0.02))
    values = quantised.transpose(0, 1).reshape(quantised.shape[1], -1)
    allowed = math.ceil(0.02 * (values.shape[1] - 1))
    assert ((values > exact[:, None]).sum(dim=1) <= allowed).all()
    histogram = nd.unit_thresholds([b.acts for b in factory()], 0.02, method="histogram")
    assert ((values > histogram[:, None]).sum(dim=1) > allowed).any()
    with pytest.raises(ConfigError, match="factory"):
        nd.unit_thresholds(iter([acts]), 0.02)
    with pytest.raises(ConfigError, match="threshold"):
        nd.unit_thresholds([acts], 0.02, method="sketch")


def test_activations_that_change_between_passes_give_a_bracketed_threshold_not_a_crash():
    """A non-deterministic kernel can shift values between passes; the unit then keeps its
    bracket's edge (counted in ``drifted``) instead of failing the layer."""
    acts = torch.rand(20, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    calls = []

    def factory():
        calls.append(1)
        yield acts if len(calls) == 1 else acts + 0.01 * len(calls)  # every later pass differs

    estimator = nd.UnitQuantile(0.05, bins=16)
    for batch in factory():
        estimator.update(batch)
    thresholds = estimator.refine(factory)
    assert estimator.drifted > 0
    exact = exact_thresholds(acts, 0.05)
    assert ((thresholds - exact).abs() <= 3 * estimator.width).all()  # within the first bracket


def test_bad_inputs_are_reported_clearly():
    with pytest.raises(ConfigError, match="quantile"):
        nd.UnitQuantile(1.5)
    tally = nd.IoUTally(torch.zeros(2))
    with pytest.raises(ValueError, match="seg_size"):
        tally.update(torch.zeros(1, 2, 4, 4), [{}], [{"scene": [1]}])
    with pytest.raises(ValueError, match="integer label array"):
        tally.update(torch.zeros(1, 2, 4, 4), [{"object": np.zeros((1, 8, 8), np.float32)}])


# --------------------------------------------------------------------------------------------
# memory: peak RSS of a fresh process, N vs 4N probe images

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    from xai_audit.tasks.dissect.netdissect import DissectBatch, dissect_layer

    n_images, naive = int(sys.argv[1]), sys.argv[2] == "naive"
    units, low, size, batch = 64, 8, 32, 32
    kept = []

    def factory():
        for b in range(n_images // batch):
            rng = np.random.default_rng(b)
            acts = torch.from_numpy(rng.standard_normal((batch, units, low, low), dtype=np.float32))
            if naive:  # what a non-streaming dissection holds: every upsampled map
                kept.append(F.interpolate(acts, size=(size, size), mode="bilinear"))
            masks = [{"object": rng.integers(0, 30, (1, size, size), dtype=np.int32)} for _ in range(batch)]
            labels = [{"scene": [int(rng.integers(31, 35))]} for _ in range(batch)]
            yield DissectBatch(acts, masks, labels, [f"{b}/{i}" for i in range(batch)])

    def status_kib(key):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(key + ":"))

    names = {i: f"l{i}" for i in range(40)}
    # Reset the high-water mark so import-time peaks (a CUDA torch build maps large libraries)
    # cannot hide the growth being measured.
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    base = status_kib("VmRSS")
    dissect_layer(factory, names)
    print(json.dumps({"growth_kib": status_kib("VmHWM") - base}))
    """
)


def _peak_growth(n_images: int, mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(n_images), mode],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["growth_kib"]


def test_memory_does_not_grow_with_the_probe_set():
    """Peak RSS growth (over the process's own baseline) on 4× the images stays < 1.25× — and
    the measurement is sensitive: holding every upsampled map, as a naive dissection does, fails it."""
    small, large = _peak_growth(256, "stream"), _peak_growth(1024, "stream")
    assert large < 1.25 * max(small, 1), (small, large)
    naive_small, naive_large = _peak_growth(256, "naive"), _peak_growth(1024, "naive")
    assert naive_large > 1.25 * naive_small, (naive_small, naive_large)


def test_unit_rows_are_parquet_ready_and_units_without_labels_get_none():
    import pyarrow as pa

    acts, masks, labels, ids = planted_probe(40, seed=4)
    frame = nd.dissect_layer(batches_of(acts, masks, labels, ids, 20), NAMES, CATEGORY, quantile=0.02)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    top_type = pa.list_(pa.struct([("concept", pa.string()), ("score", pa.float32())]))
    assert table.column("top_concepts").cast(top_type).type == top_type
    assert table.column("top_images").type == pa.list_(pa.string())
    assert table.column("best_per_category").type.value_type.names == ["category", "concept", "score"]
    assert table.column("interpretable").type == pa.bool_()

    blank = [{"object": np.zeros((1, 32, 32), np.int32)}] * 4
    empty = nd.dissect_layer(lambda: [nd.DissectBatch(acts[:4], blank)], NAMES, quantile=0.02)
    assert empty.concept.isna().all() and (empty.score == 0).all() and not empty.interpretable.any()


@pytest.mark.parametrize("threshold", ["histogram", "exact"])
def test_layers_share_each_pass_and_match_single_layer_dissection(threshold):
    acts, masks, labels, ids = planted_probe(60, seed=6)
    coarse = F.avg_pool2d(acts, 2)  # a second, lower-resolution "layer"
    calls = []

    def factory():
        calls.append(1)
        for start in range(0, 60, 20):
            end = start + 20
            yield nd.DissectBatch(
                {"fine": acts[start:end], "coarse": coarse[start:end]},
                masks[start:end],
                labels[start:end],
                ids[start:end],
            )

    options = dict(quantile=0.02, threshold=threshold)
    both = nd.dissect_layers(factory, NAMES, CATEGORY, **options)
    # every layer in each pass: the histogram, the exact selection's passes, the tallies
    assert (len(calls) == 2) if threshold == "histogram" else (3 <= len(calls) <= 4)
    for name, layer_acts in (("fine", acts), ("coarse", coarse)):
        alone = nd.dissect_layer(batches_of(layer_acts, masks, labels, ids, 20), NAMES, CATEGORY, **options)
        assert both[name].drop(columns=["threshold"]).equals(alone.drop(columns=["threshold"]))
        assert both[name].threshold.equals(alone.threshold)
