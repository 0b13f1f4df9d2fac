"""Labels as the papers' reference pipelines compute them: features in, labels out.

Each test runs the project's whole labelling path for one method (the functions the dissect stage
calls, with the stage's config) and an independent numpy implementation of the reference
pipeline, written from the paper and the reference code's published description (not copied),
on seeded synthetic features built so that the labels differ between the right pipeline and the
wrong one we had: CLIP-Dissect's similarity scale and Network Dissection's threshold. Each
reference says what the reference does and where that was read.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax

from tests.fixtures.label_references import reference_netdissect
from tests.fixtures.planted_models import model_config
from xai_audit.tasks.core.config import parse_config
from xai_audit.tasks.dissect import netdissect as nd
from xai_audit.tasks.dissect.clip_dissect import image_concept_matrix
from xai_audit.tasks.dissect.probe import Probe
from xai_audit.tasks.dissect.stage import clip_dissect_rows

# --------------------------------------------------------------------------------------------
# CLIP-Dissect (Oikarinen & Weng, ICLR 2023)


def reference_clip_dissect(
    image_features: np.ndarray, text_features: np.ndarray, activations: np.ndarray, similarity: str, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """``(labels [units], scores [units, concepts])`` as the reference code computes them.

    Read in Trustworthy-ML-Lab/CLIP-dissect: ``utils.get_similarity_from_activations`` divides
    image and text features by their L2 norms and passes ``clip_feats = image @ text.T`` — plain
    cosines, no logit scale (``scale`` exists only to build the wrong pipeline for comparison) —
    with the pooled activations ``target_feats [images, units]`` to the similarity function of
    ``similarity.py``; ``describe_neurons.py`` labels each unit with the argmax over concepts.
    ``wpmi`` (top_k=28, a=2, lam=0.6) and ``soft_wpmi`` (top_k=100, a=10, lam=1, p_start=0.998,
    p_end=0.97) take ``softmax(a · clip_feats)`` over concepts, the unit's ``top_k`` most
    activating images (``torch.topk`` over images), sum ``log(p + min_prob)`` (WPMI) or
    ``log(1 + p_r (p − 1) + min_prob)`` with ``p_r = p_start − r/top_k (p_start − p_end)``
    (soft-WPMI) over them, and subtract ``lam · (logsumexp over units − log n_units)``;
    ``cos_similarity`` is the cosine between a unit's activations and each concept's column.
    """
    image = image_features / np.linalg.norm(image_features, axis=1, keepdims=True)
    text = text_features / np.linalg.norm(text_features, axis=1, keepdims=True)
    clip_feats = scale * (image @ text.T)
    if similarity == "cos_similarity":
        cols = clip_feats / np.linalg.norm(clip_feats, axis=0, keepdims=True)
        acts = activations / np.linalg.norm(activations, axis=0, keepdims=True)
        scores = acts.T @ cols
        return scores.argmax(axis=1), scores
    top_k, a, lam = {"wpmi": (28, 2.0, 0.6), "soft_wpmi": (100, 10.0, 1.0)}[similarity]
    probs = softmax(a * clip_feats, axis=1)
    top = np.argsort(-activations, axis=0, kind="stable")[:top_k].T  # [units, top_k]
    chosen = probs[top]  # [units, top_k, concepts]
    if similarity == "wpmi":
        log_given_unit = np.log(chosen + 1e-7).sum(axis=1)
    else:
        p_in = 0.998 - np.arange(top_k) / top_k * (0.998 - 0.97)
        log_given_unit = np.log(1 + p_in[None, :, None] * (chosen - 1) + 1e-7).sum(axis=1)
    log_concept = logsumexp(log_given_unit, axis=0) - math.log(log_given_unit.shape[0])
    scores = log_given_unit - lam * log_concept
    return scores.argmax(axis=1), scores


def clip_world(seed: int, n_images: int = 400, n_concepts: int = 24, n_units: int = 48, dim: int = 48):
    """Unnormalised CLIP-like image and text features and pooled activations: each image shows
    one or two concepts; each unit follows one concept's presence, or two, or none, plus noise."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(dim)
    text = shared + rng.standard_normal((n_concepts, dim))  # cosines mostly positive, as CLIP's
    shown = np.zeros((n_images, n_concepts))
    for i in range(n_images):
        shown[i, rng.choice(n_concepts, size=rng.integers(1, 3), replace=False)] = 1
    image = shown @ text + 1.2 * rng.standard_normal((n_images, dim))
    image *= rng.uniform(0.5, 3.0, (n_images, 1))  # norms carry nothing; both pipelines normalise
    text *= rng.uniform(0.5, 3.0, (n_concepts, 1))
    tuning = np.zeros((n_concepts, n_units))
    for unit in range(n_units):
        tuning[rng.choice(n_concepts, size=unit % 3, replace=False), unit] = rng.uniform(0.5, 1.5)
    activations = np.maximum(shown @ tuning + 0.6 * rng.standard_normal((n_images, n_units)), 0)
    activations += 1e-3 * rng.random((n_images, n_units))  # no ties in the top-k ranking
    return image.astype(np.float32), text.astype(np.float32), activations.astype(np.float32)


@pytest.mark.parametrize("similarity", ["soft_wpmi", "wpmi", "cos_similarity"])
def test_clip_dissect_labels_match_the_reference_pipeline(similarity):
    image, text, activations = clip_world(seed=11)
    concepts = [f"concept{i}" for i in range(text.shape[0])]
    config = parse_config(
        {"device": "cpu", "models": [model_config()], "dissect": {"clip": {"similarity": similarity}}}
    )
    probe = Probe("", None, "synthetic", [f"{i}.png" for i in range(image.shape[0])], [], [])
    matrix = image_concept_matrix(torch.from_numpy(image), torch.from_numpy(text))
    ours = clip_dissect_rows(config, matrix, torch.from_numpy(activations), probe, concepts, {})

    labels, scores = reference_clip_dissect(image.astype(np.float64), text, activations.astype(np.float64), similarity)
    ordered = np.sort(scores, axis=1)
    decided = ordered[:, -1] - ordered[:, -2] > 1e-3  # float32 vs float64 can only swap near-ties
    assert decided.mean() > 0.9
    assert (ours.concept.to_numpy()[decided] == np.asarray(concepts)[labels[decided]]).all()
    np.testing.assert_allclose(ours.score, scores.max(axis=1), rtol=1e-4, atol=1e-4)

    wrong, _ = reference_clip_dissect(image, text, activations, similarity, scale=100.0)
    changed = (wrong != labels).mean()
    if similarity == "cos_similarity":
        assert changed == 0  # a cosine does not see a scale
    else:
        assert changed > 0.3  # the ×100 we had changes many labels: these inputs can tell the two apart


# --------------------------------------------------------------------------------------------
# Network Dissection (Bau et al., CVPR 2017)

NATIVE, SEG, UNITS, IMAGES, QUANTILE = 8, 16, 6, 40, 0.05
PLATEAU = 200  # on the 8-bit grid: activations k/255 tie by the dozen


def tied_threshold_world(seed: int):
    """Per unit k, 100 values above the plateau on its "a_k" blocks and 40 values tied at
    ``PLATEAU / 255`` on its "b_k" blocks; label ``a_k`` (colour) covers the a-blocks, ``c_k``
    (part) the a- and b-blocks, and a material label random pixels of only half the images.
    The 0.05 quantile's order statistic falls inside the tied group, so only the a-blocks are
    active (a_k wins); a threshold just below the group adds the b-blocks (c_k would win)."""
    rng = np.random.default_rng(seed)
    acts = rng.integers(0, 151, (IMAGES, UNITS, NATIVE, NATIVE))
    color = np.zeros((IMAGES, UNITS, SEG, SEG), np.int32)
    part = np.zeros((IMAGES, UNITS, SEG, SEG), np.int32)
    for unit in range(UNITS):
        images = rng.permutation(IMAGES)
        for order, image in enumerate(images[:35]):
            y, x = 2 * rng.integers(0, NATIVE // 2, 2)
            block = (slice(y, y + 2), slice(x, x + 2))
            seg_block = (slice(2 * y, 2 * y + 4), slice(2 * x, 2 * x + 4))
            if order < 25:  # 25 images x 4 values above the plateau
                acts[image, unit][block] = rng.integers(220, 256, (2, 2))
                color[image, unit][seg_block] = 1 + unit
            else:  # 10 images x 4 values tied at the plateau
                acts[image, unit][block] = PLATEAU
            part[image, unit][seg_block] = 1 + UNITS + unit
    material = np.where(rng.random((IMAGES, 1, SEG, SEG)) < 0.3, 1 + 2 * UNITS, 0).astype(np.int32)
    masks = {"color": color, "part": part, "material": material}
    annotated = {"color": np.ones(IMAGES, bool), "part": np.ones(IMAGES, bool), "material": np.arange(IMAGES) % 2 == 0}
    return (acts / 255).astype(np.float32), masks, annotated


def test_network_dissection_labels_match_the_reference_pipeline():
    acts, masks, annotated = tied_threshold_world(seed=5)
    names = {1 + u: f"a{u}" for u in range(UNITS)} | {1 + UNITS + u: f"c{u}" for u in range(UNITS)}
    names[1 + 2 * UNITS] = "grain"
    categories = {label: ("color" if label <= UNITS else "part") for label in names} | {1 + 2 * UNITS: "material"}

    def batches():
        for start in range(0, IMAGES, 8):
            stop = start + 8
            image_masks = [
                {category: masks[category][i] for category in masks if annotated[category][i]}
                for i in range(start, stop)
            ]
            yield nd.DissectBatch(
                torch.from_numpy(acts[start:stop]), image_masks, None, [str(i) for i in range(start, stop)]
            )

    config = parse_config({"device": "cpu", "models": [model_config()]}).dissect.netdissect  # the stage's defaults
    assert config.threshold == "exact"
    ours = nd.dissect_layer(batches, names, categories, quantile=QUANTILE, threshold=config.threshold, top_k=13)

    # Activations on the 8-bit grid and an upsampling factor of 2 make up − T a multiple of
    # 1/(16·255): the reference's strict comparison is exact with a 1e-9 margin.
    thresholds, iou = reference_netdissect(acts, masks, annotated, QUANTILE, margin=1e-9)
    np.testing.assert_array_equal(ours.threshold.to_numpy(), thresholds.astype(np.float32))
    assert (thresholds == PLATEAU / np.float32(255)).all()  # the order statistic is the tied value
    expected = [names[int(label)] for label in iou.argmax(axis=1)]
    assert ours.concept.tolist() == expected == [f"a{u}" for u in range(UNITS)]
    for unit, top in enumerate(ours.top_concepts):
        for entry in top:
            label = next(number for number, name in names.items() if name == entry["concept"])
            assert entry["score"] == pytest.approx(iou[unit, label], abs=1e-7)

    below = np.nextafter(thresholds.astype(np.float32), -np.inf)  # where a threshold under the tie lands
    tally = nd.IoUTally(torch.from_numpy(below), label_categories=categories)
    for batch in batches():
        tally.update(*batch)
    labels, _, wrong_iou, _, _ = tally.scores()
    wrong = [names[labels[int(j)]] for j in wrong_iou.argmax(dim=1)]
    assert wrong == [f"c{u}" for u in range(UNITS)]  # these inputs tell the two thresholds apart
