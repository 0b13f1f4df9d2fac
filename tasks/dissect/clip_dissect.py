"""CLIP-Dissect (Oikarinen & Weng, ICLR 2023): label each unit with the concept whose CLIP
image-concept similarities over the probe set best match the unit's activations.

Pipeline: CLIP image features of the probe set and text features of the concept set (both
L2-normalised, cached) → the image-concept matrix of cosines ``P = I @ Tᵀ`` → one similarity
function ``fn(P, Q) -> [n_units, n_concepts]`` with ``Q`` the pooled unit activations → per-unit
labels. This is the reference code's pipeline (Trustworthy-ML-Lab/CLIP-dissect,
``utils.get_similarity_from_activations``): plain cosines, no logit scale; (soft-)WPMI apply their
own softmax temperature ``a`` to them.

**contract** — every similarity function takes ``clip_feats: Tensor[n_images, n_concepts]`` and
``target_feats: Tensor[n_images, n_units]`` and returns ``Tensor[n_units, n_concepts]`` (float32,
CPU; higher = better match). Work is vectorised over chunks of units whose size is set by
``chunk`` (units per chunk) or, when None, by a memory budget; ``device`` says where to compute.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from xai_audit.tasks.core.cache import cache_dir
from xai_audit.tasks.core.errors import ConfigError
from xai_audit.tasks.core.progress import track
from xai_audit.tasks.dissect.activations import read_cached_tensor, write_tensor_atomic
from xai_audit.tasks.dissect.ties import DEFAULT_TIE_TOLERANCE, tied_concepts

if TYPE_CHECKING:  # pandas only for label_units, so the similarity functions need torch alone
    import pandas as pd

# Bytes the largest temporary of one unit chunk may take (the whole result comes on top).
CHUNK_BUDGET_BYTES = 32 * 2**20

MAX_CONCEPT_CHARS = 200


# --------------------------------------------------------------------------------------------
# shared machinery of the similarity functions


def _check_inputs(clip_feats: Tensor, target_feats: Tensor) -> None:
    if clip_feats.dim() != 2 or target_feats.dim() != 2:
        raise ValueError(
            f"expected clip_feats [n_images, n_concepts] and target_feats [n_images, n_units], "
            f"got shapes {tuple(clip_feats.shape)} and {tuple(target_feats.shape)}"
        )
    if clip_feats.shape[0] != target_feats.shape[0]:
        raise ValueError(f"clip_feats has {clip_feats.shape[0]} images but target_feats has {target_feats.shape[0]}")


def _unit_slices(n_units: int, bytes_per_unit: int, chunk: int | None) -> Iterator[slice]:
    if chunk is None:
        chunk = max(1, CHUNK_BUDGET_BYTES // max(1, bytes_per_unit))
    if chunk < 1:
        raise ConfigError("chunk", f"must be a positive number of units, got {chunk}")
    for start in range(0, n_units, chunk):
        yield slice(start, min(start + chunk, n_units))


def _device(device: str | torch.device | None, like: Tensor) -> torch.device:
    return like.device if device is None else torch.device(device)


def _unit_matmul(left: Tensor, right: Tensor, device: torch.device, chunk: int | None) -> Tensor:
    """``left.T @ right`` ([n_units, n_concepts]) computed over chunks of units (left's columns)."""
    right = right.to(device)
    out = torch.empty(left.shape[1], right.shape[1], dtype=torch.float32)
    for rows in _unit_slices(left.shape[1], 4 * right.shape[1], chunk):
        out[rows] = (left[:, rows].to(device).T @ right).cpu()
    return out


def _standardised_cubed(x: Tensor) -> Tensor:
    """Per column: zero mean, unit std, cubed, then unit L2 norm; constant columns become 0.

    One working copy of ``x`` (the paper-scale image-concept matrix is ~0.8 GB).
    """
    var, mean = torch.var_mean(x, dim=0, correction=0, keepdim=True)
    std = var.sqrt_().float()
    magnitude = torch.maximum(x.amax(dim=0, keepdim=True), -x.amin(dim=0, keepdim=True)).float()
    # A column is constant when its spread is float32 round-off of its magnitude.
    constant = std <= 1e-6 * magnitude + 1e-30
    z = x.to(torch.float32, copy=True)
    z -= mean.float()
    z /= torch.where(constant, torch.ones_like(std), std)
    z.masked_fill_(constant.expand_as(z), 0.0)
    z.pow_(3)
    z /= z.norm(dim=0, keepdim=True).clamp_min_(1e-30)
    return z


def _concept_probabilities(clip_feats: Tensor, a: float, device: torch.device) -> Tensor:
    """``p(concept | image) = softmax(a · P[i, :])``, computed in row chunks to avoid copies."""
    probs = torch.empty(clip_feats.shape, dtype=torch.float32, device=device)
    rows_per_step = max(1, CHUNK_BUDGET_BYTES // (8 * max(1, clip_feats.shape[1])))
    for start in range(0, clip_feats.shape[0], rows_per_step):
        rows = slice(start, start + rows_per_step)
        probs[rows] = torch.softmax(a * clip_feats[rows].to(device, torch.float32), dim=1)
    return probs


def _top_images(target_feats: Tensor, top_k: int, device: torch.device) -> Tensor:
    """Indices ``[n_units, top_k]`` of each unit's most activating images, most activating first."""
    if not 1 <= top_k <= target_feats.shape[0]:
        raise ConfigError("top_k", f"must be between 1 and the number of images ({target_feats.shape[0]}), got {top_k}")
    return torch.topk(target_feats.to(device, torch.float32), k=top_k, dim=0).indices.T.contiguous()


def _pointwise_mutual_information(log_p_given_unit: Tensor, lam: float) -> Tensor:
    """``log p(c|unit) − λ·log p(c)`` with ``p(c)`` the mean of ``p(c|unit)`` over all units."""
    n_units = log_p_given_unit.shape[0]
    log_p_concept = torch.logsumexp(log_p_given_unit, dim=0, keepdim=True) - math.log(n_units)
    return (log_p_given_unit - lam * log_p_concept).to(torch.float32).cpu()


# --------------------------------------------------------------------------------------------
# the five similarity functions (each states its formula and nothing else)


def cos_similarity(
    clip_feats: Tensor, target_feats: Tensor, *, device: str | torch.device | None = None, chunk: int | None = None
) -> Tensor:
    """Cosine between each unit's activation column and each concept's similarity column.

    ``sim(k, m) = ⟨q_k, P_:m⟩ / (‖q_k‖ ‖P_:m‖)`` over images, no centring (as in the paper's
    code); an all-zero column scores 0.
    """
    _check_inputs(clip_feats, target_feats)
    dev = _device(device, clip_feats)
    concepts = F.normalize(clip_feats.to(dev, torch.float32), dim=0)
    units = F.normalize(target_feats.to(torch.float32), dim=0)
    return _unit_matmul(units, concepts, dev, chunk)


def cos_similarity_cubed(
    clip_feats: Tensor, target_feats: Tensor, *, device: str | torch.device | None = None, chunk: int | None = None
) -> Tensor:
    """Cosine after standardising each column (zero mean, unit std) and cubing it elementwise.

    Cubing emphasises the images where a unit (or a concept) is far above its mean. A constant
    column (a dead unit) scores 0 against every concept.
    """
    _check_inputs(clip_feats, target_feats)
    dev = _device(device, clip_feats)
    concepts = _standardised_cubed(clip_feats.to(dev))
    units = _standardised_cubed(target_feats)
    return _unit_matmul(units, concepts, dev, chunk)


def rank_reorder(
    clip_feats: Tensor,
    target_feats: Tensor,
    *,
    p: float = 3,
    top_fraction: float = 0.05,
    scale_p: float = 0.5,
    device: str | torch.device | None = None,
    chunk: int | None = None,
) -> Tensor:
    """How little a unit's top activations change when re-ordered by a concept's CLIP ranking.

    For unit k take its ``n = ⌊top_fraction · n_images⌋`` most activating images with
    activations ``v`` (descending) and ascending copy ``s``. For concept m, sort those images by
    ``P[i, m]``; pairing the j-th smallest-CLIP image with ``s_j`` gives the error
    ``e = mean_j |v_(order_j) − s_j|^p``, normalised by the expected error of a random
    re-ordering, ``b = mean_{i,j} |s_i − s_j|^p`` (the reference code estimates it from 5 random
    permutations; we use its exact expectation, so results are deterministic), and divided by
    ``mean_top P[:, m] ^ scale_p`` (clamped at 1e-6 so non-positive means cannot give NaN):
    ``sim = −e / b / mean^scale_p``. A unit whose top activations are all equal scores 0.
    """
    _check_inputs(clip_feats, target_feats)
    n_images, n_concepts = clip_feats.shape
    top_n = int(n_images * top_fraction)
    if top_n < 2:
        raise ConfigError(
            "top_fraction", f"{top_fraction} of {n_images} images leaves {top_n} < 2 images per unit; raise it"
        )
    dev = _device(device, clip_feats)
    clip_dev = clip_feats.to(dev, torch.float32)
    values, indices = torch.topk(target_feats.to(dev, torch.float32), k=top_n, dim=0)
    values, indices = values.T.contiguous(), indices.T.contiguous()  # [units, top_n], descending
    out = torch.empty(target_feats.shape[1], n_concepts, dtype=torch.float32)
    # Bytes per (unit, concept) cell of the top-n block: gathered P, argsort indices, re-ordered
    # values; plus the unit's top_n × top_n baseline differences.
    concept_step = max(1, min(n_concepts, CHUNK_BUDGET_BYTES // (16 * top_n)))
    per_unit = 16 * top_n * concept_step + 4 * top_n * top_n
    for rows in _unit_slices(target_feats.shape[1], per_unit, chunk):
        v = values[rows]
        s = v.flip(1)
        baseline = (s[:, :, None] - s[:, None, :]).abs_().pow_(p).mean(dim=(1, 2)).clamp_min_(1e-30)
        for start in range(0, n_concepts, concept_step):
            cols = slice(start, start + concept_step)
            block = clip_dev[indices[rows].reshape(-1), cols].view(v.shape[0], top_n, -1)
            mean_clip = block.mean(dim=1)
            order = block.argsort(dim=1)
            reordered = torch.gather(v[:, :, None].expand_as(block), 1, order)
            error = (reordered - s[:, :, None]).abs_().pow_(p).mean(dim=1)
            score = -(error / baseline[:, None]) / mean_clip.clamp_min(1e-6).pow(scale_p)
            out[rows, cols] = score.cpu()
    return out


def wpmi(
    clip_feats: Tensor,
    target_feats: Tensor,
    *,
    top_k: int = 28,
    a: float = 2,
    lam: float = 0.6,
    min_prob: float = 1e-7,
    device: str | torch.device | None = None,
    chunk: int | None = None,
) -> Tensor:
    """Weighted pointwise mutual information between a unit's top images and each concept.

    ``p(c|x) = softmax(a · P[x, :])_c``; a unit's top-``top_k`` images ``B_k`` are treated as
    independent, ``log p(c|k) = Σ_{x∈B_k} log(p(c|x) + min_prob)``; ``p(c)`` is the mean of
    ``p(c|k)`` over all units, and ``sim = log p(c|k) − lam · log p(c)``.
    """
    _check_inputs(clip_feats, target_feats)
    dev = _device(device, clip_feats)
    log_probs = _concept_probabilities(clip_feats, a, dev).add_(min_prob).log_()
    top = _top_images(target_feats, top_k, dev)
    n_units, n_concepts = top.shape[0], log_probs.shape[1]
    log_given_unit = torch.empty(n_units, n_concepts, dtype=torch.float64, device=dev)
    for rows in _unit_slices(n_units, 4 * top_k * n_concepts, chunk):
        block = log_probs[top[rows].reshape(-1)].view(-1, top_k, n_concepts)
        log_given_unit[rows] = block.sum(dim=1, dtype=torch.float64)
    return _pointwise_mutual_information(log_given_unit, lam)


def soft_wpmi(
    clip_feats: Tensor,
    target_feats: Tensor,
    *,
    top_k: int = 100,
    a: float = 10,
    lam: float = 1,
    min_prob: float = 1e-7,
    p_start: float = 0.998,
    p_end: float = 0.97,
    device: str | torch.device | None = None,
    chunk: int | None = None,
) -> Tensor:
    """WPMI where the r-th most activating image belongs to the unit's set only with probability p_r.

    ``p_r = p_start − (r / top_k)(p_start − p_end)`` for ranks ``r = 0 … top_k−1`` (linear, as in
    the reference code, so the last rank sits one step above ``p_end``);
    ``log p(c|k) = Σ_r log(1 + p_r (p(c|x_r) − 1) + min_prob)``; then, as in :func:`wpmi`,
    ``sim = log p(c|k) − lam · log mean_units p(c|k)``.
    """
    _check_inputs(clip_feats, target_feats)
    if not (0 <= p_end <= 1 and 0 <= p_start <= 1):
        raise ConfigError("p_start", f"p_start={p_start} and p_end={p_end} must be probabilities in [0, 1]")
    dev = _device(device, clip_feats)
    probs = _concept_probabilities(clip_feats, a, dev)
    top = _top_images(target_feats, top_k, dev)
    n_units, n_concepts = top.shape[0], probs.shape[1]
    # 1 + p(x − 1) + m = p·x + (1 − p + m); the constant is formed in float64 because 1 − p
    # cancels badly in float32 and every rank's error would add up in the sum.
    ranks = torch.arange(top_k, dtype=torch.float64)
    p_in = p_start - ranks / top_k * (p_start - p_end)
    offset64 = 1.0 - p_in + min_prob
    # Logs dominate the cost, so factors are multiplied in groups of ranks first (one log per
    # group). Every factor is >= min(offset), so a group's product stays above 1e-30, far from
    # float32 underflow; the few ranks of a last, shorter group are padded with factor 1.
    smallest = float(offset64.min())
    if smallest <= 0:
        raise ConfigError("min_prob", f"p_start={p_start} with min_prob={min_prob} allows log(0); raise min_prob")
    longest = max(1, int(30 / -math.log10(smallest))) if smallest < 1 else top_k
    n_groups = -(-top_k // min(longest, top_k))
    group = -(-top_k // n_groups)
    padded = n_groups * group
    slope = torch.zeros(padded, dtype=torch.float64)
    slope[:top_k] = p_in
    offset = torch.ones(padded, dtype=torch.float64)
    offset[:top_k] = offset64
    slope = slope.to(dev, torch.float32)[None, :, None]
    offset = offset.to(dev, torch.float32)[None, :, None]
    padded_top = torch.cat([top, top[:, :1].expand(-1, padded - top_k)], dim=1)
    log_given_unit = torch.empty(n_units, n_concepts, dtype=torch.float64, device=dev)
    for rows in _unit_slices(n_units, 4 * padded * n_concepts, chunk):
        block = probs[padded_top[rows].reshape(-1)].view(-1, padded, n_concepts)
        block.mul_(slope).add_(offset)
        products = block.view(-1, n_groups, group, n_concepts).prod(dim=2)
        log_given_unit[rows] = products.log_().sum(dim=1, dtype=torch.float64)
    return _pointwise_mutual_information(log_given_unit, lam)


SimilarityFunction = Callable[..., Tensor]

SIMILARITY_FUNCTIONS: dict[str, SimilarityFunction] = {
    fn.__name__: fn for fn in (cos_similarity, cos_similarity_cubed, rank_reorder, wpmi, soft_wpmi)
}


def similarity_function(name: str) -> SimilarityFunction:
    """The similarity function registered under ``name`` (a config value)."""
    try:
        return SIMILARITY_FUNCTIONS[name]
    except KeyError:
        valid = ", ".join(SIMILARITY_FUNCTIONS)
        raise ConfigError("similarity", f"unknown similarity function {name!r}; valid: {valid}") from None


def compute_similarity(name: str, clip_feats: Tensor, target_feats: Tensor, **params: object) -> Tensor:
    """Run the similarity function ``name`` with config ``params``, naming any unknown parameter."""
    fn = similarity_function(name)
    accepted = [p for p in inspect.signature(fn).parameters if p not in ("clip_feats", "target_feats")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            "similarity_params", f"{name} has no parameter(s) {', '.join(unknown)}; valid: {', '.join(accepted)}"
        )
    return fn(clip_feats, target_feats, **params)


# --------------------------------------------------------------------------------------------
# CLIP features


def _to_pixel_batches(images: Iterable, preprocess: Callable, batch_size: int) -> Iterator[Tensor]:
    pending: list[Tensor] = []
    for item in images:
        if isinstance(item, Tensor) and item.dim() == 4:
            if pending:
                yield torch.stack(pending)
                pending = []
            yield item
            continue
        pending.append(item if isinstance(item, Tensor) else preprocess(item))
        if len(pending) == batch_size:
            yield torch.stack(pending)
            pending = []
    if pending:
        yield torch.stack(pending)


def clip_image_features(
    model: torch.nn.Module,
    preprocess: Callable,
    images: Iterable,
    device: str | torch.device = "cpu",
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> Tensor:
    """L2-normalised CLIP image embeddings ``[n_images, d]`` (float32, CPU), in input order.

    ``images`` yields PIL images (run through ``preprocess``, the CLIP's own transform), single
    preprocessed ``[3, H, W]`` tensors, or preprocessed batches ``[b, 3, H, W]``.
    """
    device = torch.device(device)
    batches: Iterable[Tensor] = _to_pixel_batches(images, preprocess, batch_size)
    if progress:
        batches = track(batches, "CLIP image features")
    feats: list[Tensor] = []
    with torch.inference_mode():
        for batch in batches:
            out = model.encode_image(batch.to(device, non_blocking=True))
            feats.append(F.normalize(out.float(), dim=-1).cpu())
    if not feats:
        raise ConfigError("probe", "the probe set yielded no images")
    return torch.cat(feats)


def _check_template(template: str) -> None:
    try:
        ok = template.count("{}") == 1 and template.format("x") is not None
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise ConfigError("template", f"{template!r} must contain exactly one '{{}}' and no other braces")


def clip_text_features(
    model: torch.nn.Module,
    tokenizer: Callable,
    concepts: Sequence[str],
    template: str = "{}",
    device: str | torch.device = "cpu",
    *,
    batch_size: int = 256,
) -> Tensor:
    """L2-normalised CLIP text embeddings ``[n_concepts, d]`` of ``template.format(concept)``."""
    _check_template(template)
    if not concepts:
        raise ConfigError("concepts", "the concept set is empty")
    device = torch.device(device)
    prompts = [template.format(c) for c in concepts]
    feats: list[Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[start : start + batch_size]).to(device)
            feats.append(F.normalize(encode_text_trimmed(model, tokens).float(), dim=-1).cpu())
    return torch.cat(feats)


def encode_text_trimmed(model: torch.nn.Module, tokens: Tensor) -> Tensor:
    """``model.encode_text(tokens)`` with the padding after the batch's last end token left out.

    The tokenizer pads every prompt to the context length (77 for CLIP), while concept prompts
    need a handful of tokens. In open_clip's ``CLIP`` text tower attention is causal and the
    embedding is read at the end token, so no position up to it sees the padding: cutting the
    sequence after the latest end token of the batch gives the same features (up to float
    rounding of the shorter matrix products) for a fraction of the work. Text towers this does
    not hold for (no causal mask, other pooling, custom/HF towers) take ``encode_text`` as is.
    """
    import open_clip  # imported already by whoever built ``model``; kept off this module's import

    pooling = getattr(model, "text_pool_type", None)
    causal = getattr(model, "attn_mask", None)
    if not isinstance(model, open_clip.model.CLIP) or causal is None or pooling not in ("argmax", "eos"):
        return model.encode_text(tokens)
    if pooling == "argmax":
        ends = tokens.argmax(dim=-1)
    else:
        ends = (tokens == model.text_eos_id).int().argmax(dim=-1)
    length = int(ends.max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=causal[:length, :length]))
    x = open_clip.transformer.text_global_pool(x, tokens, pooling, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is None:
        return x
    return model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection


def image_concept_matrix(image_feats: Tensor, text_feats: Tensor) -> Tensor:
    """``P = normalise(image_feats) @ normalise(text_feats).T`` ``[n_images, n_concepts]``: the
    cosine of every probe image with every concept, the input of every similarity function.

    No logit scale: the reference code (``utils.get_similarity_from_activations``) L2-normalises
    both feature sets and passes their plain product, and :func:`wpmi` (``a=2``) and
    :func:`soft_wpmi` (``a=10``) apply their softmax temperature to cosines. The cosine-based
    functions do not depend on the scale; (soft-)WPMI do, strongly (a ×100 makes soft-WPMI's
    softmax nearly one-hot).
    """
    return F.normalize(image_feats.float(), dim=-1) @ F.normalize(text_feats.float(), dim=-1).T


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def clip_identity(name: str, pretrained: str | os.PathLike | None) -> str:
    """A cache identity for an open_clip model: its name plus its checkpoint's hash (or tag)."""
    if pretrained is not None and Path(pretrained).is_file():
        return f"{name}@sha256:{file_sha256(pretrained)}"
    return f"{name}@{pretrained if pretrained is not None else 'untrained'}"


def concepts_hash(concepts: Sequence[str]) -> str:
    """A stable hash of an ordered concept list (part of the text-feature cache key)."""
    return hashlib.sha256("\n".join(concepts).encode()).hexdigest()


def cached_clip_image_features(
    model: torch.nn.Module,
    preprocess: Callable,
    images_factory: Callable[[], Iterable],
    *,
    clip_identity: str,
    probe_identity: str,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    progress: bool = False,
) -> Tensor:
    """:func:`clip_image_features`, cached per (CLIP identity, probe-set identity)."""
    path = cache_dir("clip_image_features", clip=clip_identity, probe=probe_identity) / "features.safetensors"
    cached = read_cached_tensor(path)
    if cached is not None:
        return cached
    feats = clip_image_features(model, preprocess, images_factory(), device, batch_size=batch_size, progress=progress)
    write_tensor_atomic(feats, path)
    return feats


def cached_clip_text_features(
    model: torch.nn.Module,
    tokenizer: Callable,
    concepts: Sequence[str],
    *,
    clip_identity: str,
    template: str = "{}",
    device: str | torch.device = "cpu",
) -> Tensor:
    """:func:`clip_text_features`, cached per (CLIP identity, concept list, template)."""
    _check_template(template)
    path = (
        cache_dir("clip_text_features", clip=clip_identity, concepts=concepts_hash(concepts), template=template)
        / "features.safetensors"
    )
    cached = read_cached_tensor(path)
    if cached is not None and cached.shape[0] == len(concepts):
        return cached
    feats = clip_text_features(model, tokenizer, concepts, template, device)
    write_tensor_atomic(feats, path)
    return feats


# --------------------------------------------------------------------------------------------
# unit labels


def label_units(
    similarity: Tensor,
    concepts: Sequence[str],
    target_feats: Tensor,
    image_ids: Sequence[str],
    top_k: int = 5,
    top_images: int = 10,
    concept_category: Mapping[str, str] | None = None,
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE,
) -> pd.DataFrame:
    """One row per unit: best concept and score, top concepts, most activating probe images.

    Columns: ``unit`` (int), ``concept``, ``category`` (from ``concept_category``, else None),
    ``score`` (float32), ``top_concepts`` (list of ``{"concept", "score"}``, best first — Parquet
    ``list<struct<concept: string, score: float>>``), ``top_images`` (image ids, most activating
    first), ``tied_with`` (other concepts within ``tie_tolerance`` of the best, see
    :mod:`xai_audit.tasks.dissect.ties`).
    """
    import pandas as pd

    n_units, n_concepts = similarity.shape
    if n_concepts != len(concepts):
        raise ValueError(f"similarity has {n_concepts} concepts but {len(concepts)} names were given")
    if target_feats.shape != (len(image_ids), n_units):
        raise ValueError(
            f"target_feats must be [n_images={len(image_ids)}, n_units={n_units}], got {tuple(target_feats.shape)}"
        )
    scores = similarity.float().nan_to_num(nan=float("-inf"))
    best_scores, best = torch.topk(scores, k=min(top_k, n_concepts), dim=1)
    image_rank = torch.topk(target_feats.float(), k=min(top_images, len(image_ids)), dim=0).indices.T
    ties = tied_concepts(scores, concepts, best[:, 0], tie_tolerance)
    categories = concept_category or {}
    rows = []
    for unit in range(n_units):
        names = [concepts[i] for i in best[unit].tolist()]
        values = best_scores[unit].tolist()
        rows.append(
            {
                "unit": unit,
                "concept": names[0],
                "category": categories.get(names[0]),
                "score": values[0],
                "top_concepts": [{"concept": c, "score": s} for c, s in zip(names, values)],
                "top_images": [image_ids[i] for i in image_rank[unit].tolist()],
                "tied_with": ties[unit],
            }
        )
    columns = ["unit", "concept", "category", "score", "top_concepts", "top_images", "tied_with"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.astype({"unit": "int32", "score": "float32"})


# --------------------------------------------------------------------------------------------
# concept sets


def load_concepts(source: str | os.PathLike | Iterable[str | bytes], *, field: str = "concepts") -> list[str]:
    """A concept list from a UTF-8 text file (one concept per line) or an iterable of lines.

    Surrounding whitespace is stripped, blank lines are skipped, and duplicates are dropped
    (first occurrence kept, order preserved; comparison is exact, case-sensitive). A line that
    is not valid UTF-8 or longer than 200 characters is a :class:`ConfigError` naming the line:
    such a file is almost always the wrong file, and silently dropping concepts would change the
    labels. An empty result is a ConfigError too. ``field`` names the config field in errors.
    """
    if isinstance(source, (str, os.PathLike)):
        where = str(source)
        try:
            raw_lines: Iterable[str | bytes] = Path(source).read_bytes().splitlines()
        except FileNotFoundError:
            raise ConfigError(field, f"concept file {where} does not exist") from None
        except (IsADirectoryError, PermissionError) as exc:
            raise ConfigError(field, f"cannot read concept file {where}: {exc.strerror}") from None
    else:
        where, raw_lines = "concept list", source
    concepts: dict[str, None] = {}
    for number, raw in enumerate(raw_lines, start=1):
        if isinstance(raw, bytes):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ConfigError(
                    field,
                    f"{where}, line {number}: not valid UTF-8 (byte {raw[exc.start]:#04x} at "
                    f"column {exc.start + 1}); save the file as UTF-8",
                ) from None
        else:
            line = raw
        line = line.lstrip("\ufeff").strip() if number == 1 else line.strip()
        if not line:
            continue
        if len(line) > MAX_CONCEPT_CHARS:
            raise ConfigError(
                field,
                f"{where}, line {number}: concept of {len(line)} characters (at most "
                f"{MAX_CONCEPT_CHARS}); one concept per line is expected",
            )
        concepts.setdefault(line, None)
    if not concepts:
        raise ConfigError(field, f"{where} holds no concepts (every line is blank)")
    return list(concepts)


def _broden_rows(label_csv: str | os.PathLike) -> list[tuple[str, dict[str, int]]]:
    """(raw name, {category: count}) of each real label (number 0, '-', is skipped)."""
    try:
        with open(label_csv, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"number", "name", "category"} - set(reader.fieldnames or [])
            if missing:
                raise ConfigError(
                    "concepts", f"{label_csv}: not a Broden label.csv (missing columns {sorted(missing)})"
                )
            rows = []
            for row in reader:
                name = (row["name"] or "").strip()
                if row["number"].strip() == "0" or name in ("", "-"):
                    continue
                categories: dict[str, int] = {}
                for part in (row["category"] or "").split(";"):
                    part = part.strip()
                    if not part:
                        continue
                    cat, _, count = part.partition("(")
                    categories[cat.strip()] = int(count.rstrip(")") or 0) if count.rstrip(")").isdigit() else 0
                rows.append((name, categories))
            return rows
    except FileNotFoundError:
        raise ConfigError("concepts", f"Broden label file {label_csv} does not exist") from None


def broden_concept_name(name: str) -> str:
    """A Broden label name as a CLIP prompt word: ``_`` → space and the one-letter category
    suffix dropped (``red-c`` → ``red``, ``street-s`` → ``street``)."""
    name = name.replace("_", " ").strip()
    if len(name) > 2 and name[-2] == "-" and name[-1].isalpha():
        name = name[:-2]
    return name


def concepts_from_broden_labels(label_csv: str | os.PathLike, categories: Iterable[str] | None = None) -> list[str]:
    """Concept names from a Broden ``label.csv`` (cleaned by :func:`broden_concept_name`,
    duplicates dropped), optionally only labels of the given categories."""
    wanted = set(categories) if categories is not None else None
    names = [
        broden_concept_name(name) for name, cats in _broden_rows(label_csv) if wanted is None or wanted & set(cats)
    ]
    return load_concepts(names, field="concepts")


def broden_concept_categories(label_csv: str | os.PathLike) -> dict[str, str]:
    """Each cleaned Broden concept name's primary category (the one it is labelled with most)."""
    result: dict[str, str] = {}
    for name, cats in _broden_rows(label_csv):
        if cats:
            result.setdefault(broden_concept_name(name), max(cats, key=lambda c: cats[c]))
    return result
