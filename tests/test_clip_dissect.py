"""CLIP-Dissect: the five similarity functions against the paper's equations, planted units,
CLIP feature extraction with a tiny random open_clip model, unit labels and concept sets."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from scipy.special import logsumexp

from xai_audit.tasks.core.errors import ConfigError
from xai_audit.tasks.dissect import clip_dissect as cd


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small tensors on a shared 2-core machine run several times faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# plain references, written from the paper's equations: one unit at a time, float64 numpy


def ref_cos(P: np.ndarray, Q: np.ndarray) -> np.ndarray:
    out = np.zeros((Q.shape[1], P.shape[1]))
    for k in range(Q.shape[1]):
        q = Q[:, k]
        for m in range(P.shape[1]):
            out[k, m] = q @ P[:, m] / (np.linalg.norm(q) * np.linalg.norm(P[:, m]))
    return out


def ref_cos_cubed(P: np.ndarray, Q: np.ndarray) -> np.ndarray:
    def cubed(v: np.ndarray) -> np.ndarray:
        return ((v - v.mean()) / v.std()) ** 3

    out = np.zeros((Q.shape[1], P.shape[1]))
    for k in range(Q.shape[1]):
        q = cubed(Q[:, k])
        for m in range(P.shape[1]):
            c = cubed(P[:, m])
            out[k, m] = q @ c / (np.linalg.norm(q) * np.linalg.norm(c))
    return out


def ref_rank_reorder(P, Q, p=3, top_fraction=0.05, scale_p=0.5):
    n = int(Q.shape[0] * top_fraction)
    out = np.zeros((Q.shape[1], P.shape[1]))
    for k in range(Q.shape[1]):
        top = np.argsort(-Q[:, k])[:n]  # most activating first
        acts = Q[top, k]
        ascending = np.sort(acts)
        # expected error of a random re-ordering: every (i, j) pairing equally likely
        baseline = np.mean([abs(x - y) ** p for x in ascending for y in ascending])
        for m in range(P.shape[1]):
            clip = P[top, m]
            clip_rank = np.argsort(np.argsort(clip))  # 0 = least similar image
            reordered = ascending[clip_rank]  # activation that CLIP's ranking predicts
            error = np.mean(np.abs(acts - reordered) ** p)
            out[k, m] = -error / baseline / max(clip.mean(), 1e-6) ** scale_p
    return out


def _softmax_rows(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ref_wpmi(P, Q, top_k=28, a=2, lam=0.6, min_prob=1e-7):
    p_c_given_x = _softmax_rows(a * P)
    log_c_given_unit = np.zeros((Q.shape[1], P.shape[1]))
    for k in range(Q.shape[1]):
        top = np.argsort(-Q[:, k])[:top_k]
        for m in range(P.shape[1]):
            log_c_given_unit[k, m] = sum(math.log(p_c_given_x[x, m] + min_prob) for x in top)
    log_c = logsumexp(log_c_given_unit, axis=0) - math.log(Q.shape[1])  # log mean_k p(c|k)
    return log_c_given_unit - lam * log_c


def ref_soft_wpmi(P, Q, top_k=100, a=10, lam=1, min_prob=1e-7, p_start=0.998, p_end=0.97):
    p_c_given_x = _softmax_rows(a * P)
    log_c_given_unit = np.zeros((Q.shape[1], P.shape[1]))
    for k in range(Q.shape[1]):
        top = np.argsort(-Q[:, k])[:top_k]
        for m in range(P.shape[1]):
            total = 0.0
            for r, x in enumerate(top):
                p_in = p_start - r / top_k * (p_start - p_end)  # P(x_r belongs to the unit's set)
                total += math.log(1 + p_in * (p_c_given_x[x, m] - 1) + min_prob)
            log_c_given_unit[k, m] = total
    log_c = logsumexp(log_c_given_unit, axis=0) - math.log(Q.shape[1])
    return log_c_given_unit - lam * log_c


REFERENCES = {
    "cos_similarity": ref_cos,
    "cos_similarity_cubed": ref_cos_cubed,
    "rank_reorder": ref_rank_reorder,
    "wpmi": ref_wpmi,
    "soft_wpmi": ref_soft_wpmi,
}


def clip_like_inputs(n_images: int, n_concepts: int, n_units: int, seed: int, dim: int = 32):
    """A CLIP-like image-concept matrix of cosines (each image shows one concept) and unit activations."""
    g = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize
    # A direction shared by all embeddings keeps cosines positive (~0.2-0.9), as real CLIP's are.
    shared = unit(torch.randn(dim, generator=g), dim=0)
    text = unit(shared + unit(torch.randn(n_concepts, dim, generator=g), dim=1), dim=1)
    shown = torch.randint(n_concepts, (n_images,), generator=g)
    images = unit(text[shown] + 0.8 * torch.randn(n_images, dim, generator=g) / dim**0.5, dim=1)
    P = cd.image_concept_matrix(images, text)
    Q = torch.relu(torch.randn(n_images, n_units, generator=g) + 0.5)
    Q += 0.01 * torch.rand(n_images, n_units, generator=g)  # no ties among dead (zero) values
    return P, Q


# --------------------------------------------------------------------------------------------
# similarity functions


def test_registry_holds_the_five_contract_functions_by_name():
    assert set(cd.SIMILARITY_FUNCTIONS) == set(REFERENCES)
    for name, fn in cd.SIMILARITY_FUNCTIONS.items():
        assert fn.__name__ == name and cd.similarity_function(name) is fn
    with pytest.raises(ConfigError, match="soft_wpmi"):
        cd.similarity_function("softwpmi")
    P, Q = clip_like_inputs(100, 5, 3, seed=0)
    torch.testing.assert_close(cd.compute_similarity("wpmi", P, Q, top_k=10), cd.wpmi(P, Q, top_k=10))
    with pytest.raises(ConfigError, match="no parameter.*topk.*valid: top_k, a, lam"):
        cd.compute_similarity("wpmi", P, Q, topk=10)


@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize("n_images,n_concepts,n_units,chunk", [(240, 23, 7, 3), (160, 9, 13, None), (120, 40, 5, 4)])
def test_similarity_matches_the_papers_equations(name, n_images, n_concepts, n_units, chunk):
    P, Q = clip_like_inputs(n_images, n_concepts, n_units, seed=n_images + n_units)
    params = {"top_k": 20} if name == "soft_wpmi" and n_images < 200 else {}
    got = cd.SIMILARITY_FUNCTIONS[name](P, Q, chunk=chunk, **params)
    want = REFERENCES[name](P.double().numpy(), Q.double().numpy(), **params)
    assert got.shape == (n_units, n_concepts) and got.dtype == torch.float32
    assert np.abs(got.numpy() - want).max() <= 1e-4


def test_soft_wpmi_defaults_match_at_full_top_k():
    """The paper's default top_k=100 (covers every unit's set once n_images >= 100)."""
    P, Q = clip_like_inputs(300, 30, 6, seed=3)
    got = cd.soft_wpmi(P, Q, chunk=4)
    assert np.abs(got.numpy() - ref_soft_wpmi(P.double().numpy(), Q.double().numpy())).max() <= 1e-4


def test_soft_wpmi_with_near_certain_membership_stays_exact():
    """p_start = 1 lets a factor drop to min_prob: the grouped products must not underflow."""
    P, Q = clip_like_inputs(150, 12, 5, seed=4)
    params = dict(top_k=37, a=10, lam=0.5, p_start=1.0, p_end=0.9)
    got = cd.soft_wpmi(P, Q, **params)
    assert np.abs(got.numpy() - ref_soft_wpmi(P.double().numpy(), Q.double().numpy(), **params)).max() <= 1e-4


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_chunk_size_does_not_change_the_result(name):
    P, Q = clip_like_inputs(400, 17, 11, seed=5)
    fn = cd.SIMILARITY_FUNCTIONS[name]
    whole = fn(P, Q)
    for chunk in (1, 4, 11, 64):
        torch.testing.assert_close(fn(P, Q, chunk=chunk), whole, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_planted_unit_gets_its_concept_first(name):
    """A unit that fires like concept 7's CLIP similarity (plus noise) is labelled concept 7."""
    P, Q = clip_like_inputs(2000, 20, 9, seed=11)
    planted = 7
    column = P[:, planted]
    noise = 0.1 * column.std() * torch.randn(len(column), generator=torch.Generator().manual_seed(1))
    Q[:, 4] = column - column.min() + noise
    sim = cd.SIMILARITY_FUNCTIONS[name](P, Q)
    assert sim[4].argmax().item() == planted


def test_dead_unit_scores_zero_not_nan_under_cosine_functions():
    P, Q = clip_like_inputs(200, 8, 3, seed=2)
    Q[:, 1] = 0.0
    Q[:, 2] = 3.5
    for fn in (cd.cos_similarity, cd.cos_similarity_cubed):
        sim = fn(P, Q)
        assert torch.isfinite(sim).all()
        assert (sim[1] == 0).all()
    assert (cd.cos_similarity_cubed(P, Q)[2] == 0).all()


def test_similarity_rejects_mismatched_inputs():
    P, Q = clip_like_inputs(50, 4, 3, seed=0)
    with pytest.raises(ValueError, match="50 images"):
        cd.cos_similarity(P, Q[:40])
    with pytest.raises(ConfigError, match="top_fraction"):
        cd.rank_reorder(P[:30], Q[:30])  # 5 % of 30 images leaves one image per unit
    with pytest.raises(ConfigError, match="top_k"):
        cd.wpmi(P, Q, top_k=51)


# --------------------------------------------------------------------------------------------
# CLIP features through open_clip, with a tiny random model


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    path = tmp_path_factory.mktemp("clipcfg") / "xai-test-tiny-clip.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("xai-test-tiny-clip", pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer("xai-test-tiny-clip")


def _images(n: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + i, 36, 3), dtype=np.uint8)) for i in range(n)]


def test_clip_features_are_unit_norm_and_batching_does_not_matter(tiny_clip):
    model, preprocess, tokenizer = tiny_clip
    images = _images(7)
    feats = cd.clip_image_features(model, preprocess, images, batch_size=3)
    assert feats.shape == (7, 16)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(7))
    one_batch = torch.stack([preprocess(im) for im in images])
    torch.testing.assert_close(cd.clip_image_features(model, preprocess, [one_batch]), feats, atol=1e-5, rtol=1e-5)

    text = cd.clip_text_features(model, tokenizer, ["red", "striped", "circle"], template="a photo of {}")
    torch.testing.assert_close(text.norm(dim=1), torch.ones(3))
    again = cd.clip_text_features(model, tokenizer, ["circle", "red"], template="a photo of {}", batch_size=1)
    torch.testing.assert_close(again, text[[2, 0]], atol=1e-5, rtol=1e-5)
    plain = cd.clip_text_features(model, tokenizer, ["red"])
    assert not torch.allclose(plain[0], text[0])  # the template is really applied

    matrix = cd.image_concept_matrix(feats, text)
    torch.testing.assert_close(matrix, feats @ text.T)  # cosines: both sides are unit vectors
    assert matrix.abs().max() <= 1 + 1e-5
    torch.testing.assert_close(cd.image_concept_matrix(3 * feats, 0.5 * text), matrix)  # norms do not matter


def test_text_features_leave_out_the_padding_and_equal_open_clips_encode_text(tiny_clip):
    """open_clip's ``CLIP.encode_text`` runs every prompt at the full context length; the causal
    mask and end-token pooling mean the positions after the batch's last end token change nothing.
    The trimmed tower must see fewer positions and give open_clip's own features."""
    model, _, tokenizer = tiny_clip
    prompts = ["red", "a striped circle", "a very very big red striped dotted thing"]
    tokens = tokenizer(prompts)
    seen: list[int] = []
    hook = model.transformer.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[1]))
    with torch.inference_mode():
        full = model.encode_text(tokens)
        trimmed = cd.encode_text_trimmed(model, tokens)
        short = cd.encode_text_trimmed(model, tokens[:2])
    hook.remove()
    ends = tokens.argmax(dim=-1)  # the end token has the highest id
    assert seen == [tokens.shape[1], int(ends.max()) + 1, int(ends[:2].max()) + 1]
    assert seen[2] < seen[1] < tokens.shape[1]
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short, full[:2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("template", ["no placeholder", "{} and {}", "{0} {x}"])
def test_bad_prompt_template_is_a_config_error(tiny_clip, template):
    model, _, tokenizer = tiny_clip
    with pytest.raises(ConfigError, match="template"):
        cd.clip_text_features(model, tokenizer, ["red"], template=template)


def test_feature_caches_reuse_and_key_on_their_inputs(tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("XAI_AUDIT_CACHE", str(tmp_path))
    model, preprocess, tokenizer = tiny_clip
    calls = []

    def factory():
        calls.append(1)
        return _images(4)

    kw = dict(clip_identity="tiny@test", probe_identity="probe-A")
    first = cd.cached_clip_image_features(model, preprocess, factory, **kw)
    second = cd.cached_clip_image_features(model, preprocess, factory, **kw)
    assert len(calls) == 1 and torch.equal(first, second)
    cd.cached_clip_image_features(model, preprocess, factory, clip_identity="tiny@test", probe_identity="probe-B")
    assert len(calls) == 2

    text_kw = dict(clip_identity="tiny@test")
    a = cd.cached_clip_text_features(model, tokenizer, ["red", "blue"], **text_kw)
    b = cd.cached_clip_text_features(model, tokenizer, ["red", "blue"], **text_kw)
    c = cd.cached_clip_text_features(model, tokenizer, ["red", "blue"], template="a {} thing", **text_kw)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert len(list((tmp_path / "clip_text_features").iterdir())) == 2


def test_clip_identity_hashes_checkpoint_files(tmp_path):
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"weights-1")
    first = cd.clip_identity("ViT-B-16", ckpt)
    ckpt.write_bytes(b"weights-2")
    assert cd.clip_identity("ViT-B-16", ckpt) != first
    assert cd.clip_identity("ViT-B-16", "openai") == "ViT-B-16@openai"


# --------------------------------------------------------------------------------------------
# unit labels


def test_label_units_reports_best_concepts_and_most_activating_images():
    similarity = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.7, 0.2, 0.2, 0.8]])
    target = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 5.0]])
    frame = cd.label_units(
        similarity,
        ["a", "b", "c", "d"],
        target,
        ["x.png", "y.png", "z.png"],
        top_k=3,
        top_images=2,
        concept_category={"b": "color"},
    )
    columns = ["unit", "concept", "category", "score", "top_concepts", "top_images", "tied_with"]
    assert list(frame.columns) == columns
    assert frame.concept.tolist() == ["b", "d"]
    assert frame.tied_with.tolist() == [[], []]  # 0.9 vs 0.5 and 0.8 vs 0.7: clear decisions
    assert frame.category[0] == "color" and pd.isna(frame.category[1])
    assert frame.score.tolist() == pytest.approx([0.9, 0.8])
    assert [t["concept"] for t in frame.top_concepts[0]] == ["b", "c", "d"]
    assert frame.top_images.tolist() == [["y.png", "z.png"], ["z.png", "y.png"]]
    top_type = pa.list_(pa.struct([("concept", pa.string()), ("score", pa.float32())]))
    table = pa.Table.from_pandas(frame, preserve_index=False)
    assert table.column("top_concepts").type.value_type.names == ["concept", "score"]
    assert table.column("top_concepts").cast(top_type).type == top_type


def test_label_units_lists_concepts_within_the_tie_tolerance():
    """A unit whose best concepts differ by less than the tolerance is a tie, listed best first."""
    similarity = torch.tensor([[0.5, 0.9, 0.8995, 0.9004, float("nan")], [0.1, 0.2, 0.3, 0.4, 0.5]])
    target = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    concepts = ["a", "b", "c", "d", "e"]
    frame = cd.label_units(similarity, concepts, target, ["x.png", "y.png"], tie_tolerance=1e-3)
    assert frame.concept.tolist() == ["d", "e"]
    assert frame.tied_with.tolist() == [["b", "c"], []]  # 0.9 and 0.8995 are within 1e-3 of 0.9004
    strict = cd.label_units(similarity, concepts, target, ["x.png", "y.png"], tie_tolerance=0)
    assert strict.tied_with.tolist() == [[], []]


# --------------------------------------------------------------------------------------------
# concept sets


def test_load_concepts_strips_skips_blanks_and_dedupes_in_order(tmp_path):
    path = tmp_path / "concepts.txt"
    path.write_bytes("\ufeffdog\r\n  cat  \n\n\t\nDog\ndog\nred car\ncat\n".encode())
    assert cd.load_concepts(path) == ["dog", "cat", "Dog", "red car"]
    assert cd.load_concepts(["  x", "", "y", "x"]) == ["x", "y"]


def test_load_concepts_rejects_bad_files_naming_the_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"dog\ncaf\xe9\n")
    with pytest.raises(ConfigError, match=r"line 2: not valid UTF-8"):
        cd.load_concepts(bad)
    long = tmp_path / "long.txt"
    long.write_text("dog\n" + "x" * 201 + "\n")
    with pytest.raises(ConfigError, match=r"line 2: concept of 201 characters"):
        cd.load_concepts(long)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ConfigError, match="no concepts"):
        cd.load_concepts(empty)
    with pytest.raises(ConfigError, match="does not exist"):
        cd.load_concepts(tmp_path / "missing.txt")


def test_concepts_from_broden_labels_cleans_names_and_filters_categories(tmp_path):
    label_csv = tmp_path / "label.csv"
    label_csv.write_text(
        "number,name,category,frequency,coverage,syns\n"
        "0,-,-,0,0,\n"
        "1,red-c,color(289),289,9.1,\n"
        "2,wine_cellar,scene(40),40,1.0,\n"
        "3,fabric,material(36);object(3),39,4.2,cloth\n"
        "4,kitchen-s,scene(12),12,1.0,\n"
        "5,red,object(2),2,0.1,\n"
    )
    assert cd.concepts_from_broden_labels(label_csv) == ["red", "wine cellar", "fabric", "kitchen"]
    assert cd.concepts_from_broden_labels(label_csv, categories=["object"]) == ["fabric", "red"]
    assert cd.broden_concept_categories(label_csv) == {
        "red": "color",
        "wine cellar": "scene",
        "fabric": "material",
        "kitchen": "scene",
    }
