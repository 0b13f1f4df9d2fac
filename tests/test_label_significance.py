"""Label p-values (tasks/dissect/significance.py) on ground truth we built.

- Tiny constructed cases whose exact permutation p-value is computed here by enumerating every
  permutation (numpy, nothing from ``tasks``): the seeded Monte Carlo p-value must land on it.
- The planted detectors (tests/fixtures/planted_models.py) get p < 0.001 from both labellers;
  the planted constant unit gets exactly 1 (no shuffle changes it) and units of seeded noise,
  which carry no concept, get p ≥ 0.05.
- Same seed, same p-values; Benjamini–Hochberg against its textbook step-up rule.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tests.fixtures.margins import assert_at_least, assert_at_most
from tests.fixtures.planted_models import LAYER, UNITS
from xai_audit.tasks.dissect.clip_dissect import similarity_function
from xai_audit.tasks.dissect.netdissect import DissectBatch, dissect_layers
from xai_audit.tasks.dissect.significance import (
    ShuffledIntersections,
    benjamini_hochberg,
    clip_dissect_p_values,
    monte_carlo_p_values,
)

PLANTED = [UNITS.index(unit) for unit in UNITS if unit != "constant"]
CONSTANT = UNITS.index("constant")
N_NOISE = 3


def exact_clip_p_value(clip_feats: np.ndarray, unit: np.ndarray) -> float:
    """Max-T p-value of cosine scores over EVERY permutation of the images (the null's exact law)."""

    def cosines(column: np.ndarray) -> np.ndarray:
        return column @ clip_feats / (np.linalg.norm(column) * np.linalg.norm(clip_feats, axis=0))

    scores = np.array([cosines(unit[list(order)]) for order in itertools.permutations(range(len(unit)))])
    mean, std = scores.mean(axis=0), scores.std(axis=0)
    best = ((scores - mean) / std).max(axis=1)
    observed = ((cosines(unit) - mean) / std).max()
    return float(np.mean(best >= observed - 1e-12))


def test_clip_dissect_p_value_matches_the_exact_permutation_law():
    """Six images, three concepts, cosine similarity: the Monte Carlo max-T p-value (4000 shuffles)
    is within 0.03 of the exact one over all 720 orderings, for a unit that follows concept 0 and
    for one that does not."""
    rng = np.random.default_rng(3)
    clip_feats = rng.uniform(0.1, 0.4, size=(6, 3))
    following = clip_feats[:, 0] + rng.normal(0, 0.02, size=6)
    unrelated = rng.uniform(0, 1, size=6)
    target = torch.tensor(np.stack([following, unrelated], axis=1), dtype=torch.float32)
    p = clip_dissect_p_values(
        similarity_function("cos_similarity"), torch.tensor(clip_feats, dtype=torch.float32), target, count=4000, seed=0
    )
    exact = [exact_clip_p_value(clip_feats, column) for column in (following, unrelated)]
    assert exact[0] < 0.05 < exact[1]
    assert p.tolist() == pytest.approx(exact, abs=0.03)


def test_netdissect_p_value_matches_the_exact_permutation_law():
    """Five 8×8 images; label 1 covers a known region of images 0-2; the unit is active on part of
    that region in image 0 and on a corner of image 3. Its statistic Σ_j |A_j ∩ L_σ(j)| over all
    120 orderings, counted here, gives the exact p-value the seeded estimate must land on."""
    masks = np.zeros((5, 8, 8), dtype=np.int64)
    masks[0, :4, :] = 1
    masks[1, :, :2] = 1
    masks[2, 2:6, 2:6] = 1
    acts = torch.zeros(5, 1, 8, 8)
    acts[0, 0, :3, :5] = 1.0  # 15 pixels, all inside image 0's label
    acts[3, 0, 6:, 6:] = 1.0  # 4 pixels of an image without the label
    active = (acts[:, 0] > 0.5).numpy()
    observed = sum(int((active[j] & (masks[j] == 1)).sum()) for j in range(5))
    law = [
        sum(int((active[j] & (masks[order[j]] == 1)).sum()) for j in range(5))
        for order in itertools.permutations(range(5))
    ]
    exact = float(np.mean(np.array(law) >= observed))
    tally = ShuffledIntersections(torch.tensor([0.5]))
    tally.update(acts, [{"object": masks[i]} for i in range(5)])
    p, seen = tally.p_values(torch.tensor([1]), count=4000, seed=0)
    assert int(seen[0]) == observed == 15
    assert float(p[0]) == pytest.approx(exact, abs=0.03)
    assert 0.1 < exact < 0.5
    assert torch.equal(tally.p_values(torch.tensor([1]), count=4000, seed=0)[0], p)  # a seed fixes the shuffles
    assert not torch.equal(tally.p_values(torch.tensor([1]), count=4000, seed=1)[0], p)


def test_a_shuffle_that_always_reaches_the_observed_value_gives_p_one_and_none_gives_the_floor():
    """The Monte Carlo formula's two ends: (1 + R) / (1 + R) and 1 / (1 + R)."""
    p = monte_carlo_p_values(torch.tensor([1.0, 5.0]), torch.tensor([[1.0] * 9, [4.0] * 9]))
    assert p.tolist() == pytest.approx([1.0, 0.1])


def test_benjamini_hochberg_is_the_step_up_rule():
    """Reject the k smallest p-values, k the largest rank with p_(k) ≤ k·α/m (Benjamini & Hochberg
    1995), written out here; NaN is never significant."""
    p = np.array([0.001, 0.2, 0.012, 0.04, 0.03, np.nan, 0.9])
    finite = p[np.isfinite(p)]
    ranked = np.sort(finite)
    m, alpha = len(finite), 0.05
    passing = [k for k in range(1, m + 1) if ranked[k - 1] <= k * alpha / m]
    cut = ranked[max(passing) - 1] if passing else -1
    expected = np.isfinite(p) & (np.nan_to_num(p, nan=2) <= cut)
    assert benjamini_hochberg(p, alpha).tolist() == expected.tolist()
    assert expected.sum() == 2


# --------------------------------------------------------------------------------------------
# the planted detectors


def _noise_maps(n_images: int, height: int, width: int) -> torch.Tensor:
    """``[n_images, N_NOISE, h, w]`` seeded uniform noise: units that ignore the image."""
    return torch.rand(n_images, N_NOISE, height, width, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def planted_probe():
    """The planted model's config and probe (first 200 images of the default world's val split)."""
    from tests.test_dissect_planted import planted_config
    from xai_audit.tasks.dissect.probe import open_probe

    config = planted_config(probe={"limit": 200}, significance={"permutations": 1000})
    return config, open_probe(config)


@pytest.mark.slow
def test_network_dissection_p_values_separate_planted_detectors_from_constant_and_noise(planted_probe):
    """Through Network Dissection's own passes (``dissect_layers``, default quantile): every planted
    detector p < 0.001, the constant unit p = 1, three seeded-noise units p ≥ 0.05; the test makes
    no pass over the probe set beyond those of a run without it."""
    from xai_audit.tasks.data.loaded_models import using_model
    from xai_audit.tasks.dissect.probe import dissect_batches

    config, probe = planted_probe
    with using_model(config, config.models[0]) as model:
        batches = list(dissect_batches(probe, model.preprocess, model.module, [LAYER], 100, torch.device("cpu")))
    broden = probe.broden()
    start, with_noise = 0, []
    for batch in batches:
        acts = batch.acts[LAYER]
        noise = _noise_maps(start + len(acts), *acts.shape[-2:])[start:]
        with_noise.append(DissectBatch({LAYER: torch.cat([acts, noise], dim=1)}, batch.masks, batch.image_labels))
        start += len(acts)

    passes = {0: 0, 1000: 0}

    def probe_pass(permutations: int):
        passes[permutations] += 1
        return iter(with_noise)

    frames = {
        permutations: dissect_layers(
            lambda permutations=permutations: probe_pass(permutations),
            broden.label_names,
            broden.label_category,
            permutations=permutations,
            seed=0,
        )
        for permutations in passes
    }
    # the test keeps what it needs from the IoU pass: no pass over the probe set of its own
    assert passes[1000] == passes[0], passes
    frames = frames[1000]
    rows = frames[LAYER].set_index("unit")
    p = rows["p_value"]
    assert (p.loc[PLANTED] < 0.001).all(), rows.loc[PLANTED, ["concept", "score", "p_value"]]
    assert p.loc[CONSTANT] == 1.0
    assert (p.iloc[len(UNITS) :] >= 0.05).all(), rows.iloc[len(UNITS) :][["concept", "score", "p_value"]]
    print("netdissect p-values:", p.round(4).tolist())


@pytest.mark.slow
@pytest.mark.toy_clip
def test_clip_dissect_p_values_separate_planted_detectors_from_constant_and_noise(planted_probe):
    """With the toy CLIP and the paper's soft-WPMI: every planted detector p < 0.001, the constant
    unit p = 1, three seeded-noise units p ≥ 0.05; the same seed gives the same p-values and
    ``clip_dissect_rows`` writes them next to the labels."""
    from xai_audit.tasks.data.loaded_models import using_model
    from xai_audit.tasks.dissect.stage import clip_dissect_rows, clip_similarity, concept_set, pooled_layer_activations

    config, probe = planted_probe
    with using_model(config, config.models[0]) as model:
        acts = pooled_layer_activations(config, model, [LAYER], probe)[LAYER]
        concepts, categories = concept_set(config, probe, model.class_names)
    clip = clip_similarity(config, probe, concepts)
    noise = _noise_maps(acts.shape[0], 1, 1).flatten(1)
    target = torch.cat([acts, noise], dim=1)
    soft_wpmi = similarity_function("soft_wpmi")
    p = clip_dissect_p_values(soft_wpmi, clip, target, count=1000, seed=0)
    assert (p[PLANTED] < 0.001).all(), p
    assert_at_most("largest planted detector's p-value", p[PLANTED].max(), 0.001)
    assert p[CONSTANT] == 1.0
    assert_at_least("smallest noise unit's p-value", p[len(UNITS) :].min(), 0.05)
    assert torch.equal(clip_dissect_p_values(soft_wpmi, clip, target, count=1000, seed=0), p)
    rows = clip_dissect_rows(config, clip, acts, probe, concepts, categories)
    assert rows["p_value"].tolist() == pytest.approx(p[: len(UNITS)].tolist())
    print("clip_dissect p-values:", [round(v, 4) for v in p.tolist()])


def test_summary_layers_count_units_significant_after_benjamini_hochberg():
    """``summary_layers``: a layer of four planted-strength p-values and six chance ones has 4 of
    10 significant at FDR 0.05 (the k-th smallest, ≤ 0.004, is below k·0.05/10; 0.3 is above
    5·0.05/10); a layer labelled without p-values has none counted (null, not 0)."""
    import pandas as pd

    from xai_audit.tasks.results.summary import layer_units

    strong, chance = [0.001, 0.001, 0.002, 0.004], [0.3, 0.5, 0.6, 0.8, 0.9, 1.0]
    rows = [
        {
            "model": "m",
            "layer": "a",
            "unit": u,
            "method": "netdissect",
            "concept": "red",
            "category": "color",
            "score": 0.5,
            "interpretable": True,
            "tied_with": [],
            "p_value": p,
        }
        for u, p in enumerate(strong + chance)
    ] + [
        {
            "model": "m",
            "layer": "b",
            "unit": 0,
            "method": "clip_dissect",
            "concept": "red",
            "category": "color",
            "score": 0.5,
            "interpretable": None,
            "tied_with": [],
            "p_value": None,
        }
    ]
    layers = layer_units(pd.DataFrame(rows)).set_index("layer")
    assert (layers.loc["a", "tested"], layers.loc["a", "significant"]) == (10, 4)
    assert layers.loc["a", "significant_share"] == pytest.approx(0.4)
    assert pd.isna(layers.loc["b", "tested"]) and pd.isna(layers.loc["b", "significant"])
