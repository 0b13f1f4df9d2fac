"""Batched LIME for images: lime's explanation model, perturbations built as tensor ops.

What stays lime's (so a weight means what it means in LIME): the quickshift defaults, the
binary perturbation matrix (drawn from the same RandomState calls, so it equals stock
``lime_image``'s for the same seed), the hidden colour (per-superpixel mean by default), the
cosine distance to the unperturbed sample, the exponential kernel of width 0.25 and
``LimeBase.explain_instance_with_data``'s feature selection and ridge fit. What differs: the
perturbed images come from one gather of the segment map per batch instead of a per-sample
``deepcopy`` loop, the model runs on a torch device in batches of channels-last inputs through
its inference copy (BatchNorm folded, channels-last weights: :mod:`xai_audit.tasks.compute.inference`; optionally
under autocast), and segmentations are cached so parameter sets and seeds share them.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import sklearn.metrics
import torch
from lime.lime_base import LimeBase
from scipy import stats
from skimage.segmentation import felzenszwalb, quickshift, slic
from torch import Tensor, nn

from xai_audit.storage.maps import encode_map
from xai_audit.tasks.compute.batch_sizes import configured_batch_size, perturbation_batch_size
from xai_audit.tasks.compute.inference import inference_model
from xai_audit.tasks.compute.precision import autocast_context
from xai_audit.tasks.core.errors import ConfigError, ItemError, NonFiniteError
from xai_audit.tasks.data.models import PixelModel
from xai_audit.tasks.explain.base import ExplainContext, Explainer, Explanations
from xai_audit.tasks.explain.lime_convergence import AdaptiveSettings, converged, ridge_standard_errors, top_set
from xai_audit.tasks.metrics.maps import deletion_insertion, mask_iou

SEGMENTATIONS: dict[str, Callable[..., np.ndarray]] = {
    "quickshift": quickshift,
    "slic": slic,
    "felzenszwalb": felzenszwalb,
}
"""Config name -> scikit-image segmentation function."""

DEFAULT_SEGMENTATION_PARAMS: dict[str, dict[str, Any]] = {
    "quickshift": {"kernel_size": 4, "max_dist": 200, "ratio": 0.2},
    "slic": {},
    "felzenszwalb": {},
}
"""lime_image's quickshift defaults; scikit-image's own for slic and felzenszwalb."""

_NOT_PARAMETERS = {"image", "channel_axis", "mask", "return_tree"}

ModelFn = Callable[[Tensor], Tensor]
"""Maps float32 images ``[N, 3, H, W]`` with pixel values in [0, 1] to logits ``[N, classes]``."""

GPU_BATCH_SIZE = 256
"""Perturbed images per forward on accelerators when none is given (CPUs:
:mod:`xai_audit.tasks.compute.batch_sizes`)."""


def default_batch_size(device: torch.device | str, amp_dtype: torch.dtype | None = None) -> int:
    """LIME's perturbed images per forward on ``device`` at ``amp_dtype`` when none is given."""
    return perturbation_batch_size(device, amp_dtype, accelerator=GPU_BATCH_SIZE)


@dataclass(frozen=True, eq=False)
class LimeResult:
    """One image's LIME explanation for one target class."""

    segments: np.ndarray
    """int32 ``[H, W]`` superpixel ids ``0..n-1``."""
    weights: np.ndarray
    """float32 ``[n]``: each superpixel's coefficient in the ridge fit (0 if not selected)."""
    intercept: float
    score: float
    """R^2 of the weighted ridge fit on the neighbourhood."""
    local_pred: float
    """The fit's prediction for the unperturbed image."""
    target: int
    std_errors: np.ndarray | None = None
    """float32 ``[n]``: each weight's standard error
    (:func:`~xai_audit.tasks.explain.lime_convergence.ridge_standard_errors`; NaN for a superpixel the feature
    selection dropped)."""
    samples_used: int = 0
    """Perturbed samples (model evaluations) the fit used."""
    rounds: int = 1
    """Refits: 1 for fixed-N LIME, the rounds drawn for adaptive LIME."""
    stopped_early: bool = False
    """Adaptive LIME met its stopping rule before the cap."""

    @property
    def saliency_map(self) -> np.ndarray:
        """float32 ``[H, W]``: every pixel holds its superpixel's weight."""
        return self.weights[self.segments]

    def top_segments(self, k: int = 5) -> np.ndarray:
        """Ids of the (at most) ``k`` superpixels with the largest positive weights."""
        order = np.argsort(-self.weights, kind="stable")
        return order[:k][self.weights[order[:k]] > 0]

    def top_mask(self, k: int = 5) -> np.ndarray:
        """Bool ``[H, W]`` mask of the top-``k`` positive superpixels (lime's positive_only mask)."""
        return np.isin(self.segments, self.top_segments(k))


def segment(image: np.ndarray, algorithm: str = "quickshift", **params: Any) -> np.ndarray:
    """Superpixels of an ``[H, W, 3]`` image (uint8, or float in [0, 1]) as int32 ids 0..n-1.

    ``params`` override :data:`DEFAULT_SEGMENTATION_PARAMS`; ids are made consecutive from 0
    (slic starts at 1), which leaves quickshift's and felzenszwalb's labels unchanged.
    """
    function = SEGMENTATIONS.get(algorithm)
    if function is None:
        raise ConfigError("segmentation", f"unknown algorithm {algorithm!r}; valid: {', '.join(SEGMENTATIONS)}")
    check_segmentation_params(algorithm, params)
    labels = function(image, **{**DEFAULT_SEGMENTATION_PARAMS[algorithm], **params})
    _, consecutive = np.unique(labels, return_inverse=True)
    return consecutive.reshape(labels.shape).astype(np.int32)


def check_segmentation_params(algorithm: str, params: Mapping[str, Any], where: str = "segmentation") -> None:
    """ConfigError naming the valid parameters if ``params`` has one the algorithm lacks."""
    valid = set(inspect.signature(SEGMENTATIONS[algorithm]).parameters) - _NOT_PARAMETERS
    for name in params:
        if name not in valid:
            raise ConfigError(f"{where}.{name}", f"not a parameter of {algorithm}; valid: {', '.join(sorted(valid))}")


class SegmentationCache:
    """Segment maps keyed by image content, algorithm and parameters (least recently used out)."""

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def segments(self, image: np.ndarray, algorithm: str = "quickshift", **params: Any) -> np.ndarray:
        """``segment(image, algorithm, **params)``, computed once per distinct key."""
        digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16)
        digest.update(f"{image.shape}{image.dtype}".encode())
        effective = {**DEFAULT_SEGMENTATION_PARAMS.get(algorithm, {}), **params}
        key = f"{digest.hexdigest()}:{algorithm}:{json.dumps(effective, sort_keys=True, default=str)}"
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        result = segment(image, algorithm, **params)
        result.setflags(write=False)
        self._entries[key] = result
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return result


def perturbation_matrix(n_segments: int, num_samples: int, seed: int) -> np.ndarray:
    """The binary ``[num_samples, n_segments]`` matrix stock ``lime_image`` draws (row 0: all on).

    ``LimeImageExplainer(random_state=seed).explain_instance(...)`` without ``random_seed``
    first draws a segmentation seed from its RandomState (which scikit-image's quickshift no
    longer accepts, so it changes nothing), then the matrix: the same two calls here.
    """
    random_state = np.random.RandomState(seed)
    random_state.randint(0, high=1000)
    data = random_state.randint(0, 2, num_samples * n_segments).reshape((num_samples, n_segments))
    data[0, :] = 1
    return data


def to_model_scale(image: np.ndarray) -> Tensor:
    """float32 ``[3, H, W]`` in [0, 1] from an ``[H, W, 3]`` uint8 (/255) or float image."""
    array = np.asarray(image)
    values = torch.from_numpy(np.array(array, order="C")).permute(2, 0, 1)
    if array.dtype == np.uint8:
        return values.float() / 255.0
    return values.float()


def hidden_image(image: np.ndarray, segments: np.ndarray, hide_color: Any = None) -> np.ndarray:
    """What a switched-off superpixel shows, in the image's dtype: each superpixel's mean colour
    (written into the image's dtype, so truncated for uint8, as lime_image does) or ``hide_color``."""
    hidden = np.empty_like(image)
    if hide_color is not None:
        hidden[:] = hide_color
        return hidden
    flat = segments.ravel()
    counts = np.bincount(flat)
    pixels = image.reshape(-1, image.shape[-1])
    means = np.stack(
        [np.bincount(flat, weights=pixels[:, c].astype(np.float64)) / counts for c in range(pixels.shape[1])], axis=1
    )
    hidden[:] = means[segments]
    return hidden


def neighborhood_probabilities(
    model_fn: ModelFn,
    image: np.ndarray,
    hidden: np.ndarray,
    segments: np.ndarray,
    data: np.ndarray,
    *,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Softmax outputs ``[num_samples, classes]`` for every row of ``data`` (1 = superpixel shown).

    Raises :class:`NonFiniteError` when the model returns NaN/Inf for any perturbed image.
    """
    device = torch.device(device)
    batch_size = batch_size or default_batch_size(device, amp_dtype)
    normalise, network = _split_normalisation(model_fn)
    # Normalisation is per pixel, so normalising the two source images once equals normalising
    # every perturbed image: the batches below are the network's inputs as they are.
    shown = normalise(to_model_scale(image).to(device)[None])
    replaced = normalise(to_model_scale(hidden).to(device)[None])
    segment_ids = torch.from_numpy(segments.astype(np.int64)).to(device)
    on = torch.from_numpy(np.asarray(data, dtype=bool)).to(device)
    outputs = []
    network = inference_model(network, shown)  # BatchNorm folded, channels-last: logits move ~1e-6
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            keep = on[start : start + batch_size][:, segment_ids][:, None]
            batch = torch.empty((len(keep), *shown.shape[1:]), device=device, memory_format=torch.channels_last)
            torch.where(keep, shown, replaced, out=batch)
            with autocast_context(device, amp_dtype):
                logits = network(batch)
            if not torch.isfinite(logits).all():  # LIME's regression must never be fitted to NaN/Inf
                raise NonFiniteError(
                    "lime",
                    "the model's output on LIME's perturbed images is not finite (NaN/Inf)",
                    "NonFiniteOutputError",
                )
            outputs.append(torch.softmax(logits.float(), dim=-1).cpu())
    return torch.cat(outputs).numpy()


def _split_normalisation(model_fn: ModelFn) -> tuple[Callable[[Tensor], Tensor], ModelFn]:
    """``(normalise, network)``: a :class:`PixelModel`'s two halves, else no normalisation and ``model_fn``."""
    if isinstance(model_fn, PixelModel):
        return model_fn.normalise, model_fn.module
    return (lambda pixels: pixels), model_fn


def fit_explanation(
    segments: np.ndarray,
    data: np.ndarray,
    probabilities: np.ndarray,
    target: int,
    *,
    kernel_width: float = 0.25,
    num_features: int = 100000,
    distance_metric: str = "cosine",
    random_state: np.random.RandomState | None = None,
) -> LimeResult:
    """lime's explanation model on a neighbourhood: kernel-weighted ridge fit for ``target``."""
    distances = sklearn.metrics.pairwise_distances(data, data[0].reshape(1, -1), metric=distance_metric).ravel()
    kernel = partial(_lime_kernel, kernel_width=float(kernel_width))
    base = LimeBase(kernel, verbose=False, random_state=random_state)
    intercept, explanation, score, local_pred = base.explain_instance_with_data(
        data, probabilities, distances, target, num_features
    )
    weights = np.zeros(data.shape[1], dtype=np.float32)
    for feature, weight in explanation:
        weights[feature] = weight
    used = np.array([feature for feature, _ in explanation], dtype=np.int64)
    std_errors = np.full(data.shape[1], np.nan, dtype=np.float32)
    std_errors[used] = ridge_standard_errors(  # LimeBase's Ridge(alpha=1) on the same rows, labels and kernel
        data[:, used], probabilities[:, target], kernel(distances), np.array([w for _, w in explanation])
    )
    return LimeResult(
        segments=segments,
        weights=weights,
        intercept=float(intercept),
        score=float(score),
        local_pred=float(np.ravel(local_pred)[0]),
        target=int(target),
        std_errors=std_errors,
        samples_used=len(data),
    )


def explain_lime(
    model_fn: ModelFn,
    images: Sequence[np.ndarray] | np.ndarray,
    targets: Sequence[int],
    *,
    segmentation: str = "quickshift",
    segmentation_params: Mapping[str, Any] | None = None,
    num_samples: int = 1000,
    hide_color: Any = None,
    kernel_width: float = 0.25,
    num_features: int = 100000,
    seed: int = 0,
    batch_size: int | None = None,
    distance_metric: str = "cosine",
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    cache: SegmentationCache | None = None,
    adaptive: AdaptiveSettings | None = None,
) -> list[LimeResult]:
    """LIME explanations of a batch of images, one per (image, target).

    Args:
        model_fn: float32 ``[N, 3, H, W]`` images in [0, 1] -> logits ``[N, classes]`` (put the
            normalisation inside it); its softmax is the function LIME explains.
        images: ``[H, W, 3]`` images, uint8 or float in [0, 1], as stock lime_image takes them.
        targets: the class explained for each image.
        segmentation: ``quickshift`` | ``slic`` | ``felzenszwalb``; ``segmentation_params``
            override :data:`DEFAULT_SEGMENTATION_PARAMS`.
        num_samples: perturbed samples per image (row 0 is the unperturbed image).
        hide_color: colour of a switched-off superpixel in the image's scale; None: its mean.
        kernel_width, num_features, distance_metric: as ``LimeImageExplainer``/``explain_instance``.
        seed: seeds the perturbation matrix exactly as ``LimeImageExplainer(random_state=seed)``.
        batch_size: perturbed images per model call; None: :func:`default_batch_size` of the device and precision.
        device: where perturbations are built and the model runs (default: the model's device).
        amp_dtype: autocast dtype for the model calls, or None.
        cache: reuse segmentations across calls (parameter search, seeds).
        adaptive: draw the samples in rounds and stop once the top-k superpixels settle
            (:mod:`xai_audit.tasks.explain.lime_convergence`); ``num_samples`` is then the cap. None: stock's fixed N.
    """
    if len(images) != len(targets):
        raise ValueError(f"{len(targets)} targets for {len(images)} images")
    device = _device_of(model_fn) if device is None else torch.device(device)
    params = dict(segmentation_params or {})
    if cache is None:
        cache = SegmentationCache(max_entries=max(1, len(images)))
    results = []
    for image, target in zip(images, targets):
        image = _hwc(image)
        segments = cache.segments(image, segmentation, **params)
        results.append(
            _explain_one(
                model_fn,
                image,
                int(target),
                segments,
                num_samples=num_samples,
                hide_color=hide_color,
                kernel_width=kernel_width,
                num_features=num_features,
                seed=seed,
                batch_size=batch_size,
                distance_metric=distance_metric,
                device=device,
                amp_dtype=amp_dtype,
                adaptive=adaptive,
            )
        )
    return results


# --- parameter search -----------------------------------------------------------------------


def default_objective(components: Mapping[str, float]) -> float:
    """``deletion_auc + (1 - stability) / 2``, lower is better; both terms lie in [0, 1].

    ``deletion_auc`` (the first seed's map, blur baseline) is low when blurring the map's top
    pixels away makes the target probability fall fast. ``stability`` is the Spearman
    correlation of the two seeds' superpixel weights (undefined, i.e. a constant weight
    vector, counts as 0). So a perfectly stable map is worth half a unit of deletion AUC over
    one whose two seeds rank superpixels independently.
    """
    stability = components["stability"]
    stability = 0.0 if math.isnan(stability) else stability
    return components["deletion_auc"] + (1.0 - stability) / 2.0


@dataclass
class LimeTrial:
    """One parameter set of a search: its objective, the parts it combines, and its cost."""

    params: dict[str, Any]
    objective: float
    components: dict[str, float]
    seconds: float
    result: LimeResult = field(repr=False)


@dataclass
class LimeSearch:
    """Every trial of a search, in grid order, and the best (lowest objective; first on ties)."""

    trials: list[LimeTrial]
    best: LimeTrial


SEARCH_KEYS = ("segmentation", "num_samples", "kernel_width")
"""Grid keys that are not segmentation parameters."""


def lime_search(
    model_fn: ModelFn,
    image: np.ndarray,
    target: int,
    grid: Sequence[Mapping[str, Any]],
    *,
    objective_fn: Callable[[Mapping[str, float]], float] = default_objective,
    seeds: tuple[int, int] = (0, 1),
    hide_color: Any = None,
    num_features: int = 100000,
    top_k: int = 5,
    steps: int = 20,
    baseline: str = "blur",
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    cache: SegmentationCache | None = None,
) -> LimeSearch:
    """Score each grid entry's LIME map on one image and return every trial and the best.

    Each grid entry holds ``segmentation`` (default quickshift), optionally ``num_samples``
    (default 1000) and ``kernel_width`` (0.25), and any parameters of that segmentation
    algorithm, e.g. ``{"segmentation": "slic", "n_segments": 50, "num_samples": 500}``. A trial
    runs LIME with both ``seeds`` on one (cached) segmentation and records ``deletion_auc`` and
    ``insertion_auc`` of the first seed's map (baseline ``blur`` by default: in the [0, 1]
    pixel scale model_fn takes, ``mean`` would be black), ``stability`` (Spearman of the two
    seeds' superpixel weights), ``top_k_jaccard`` (of the two seeds' top-k positive
    superpixels) and ``n_segments``; ``objective_fn`` turns them into the objective.
    """
    entries = [_search_entry(index, entry) for index, entry in enumerate(grid)]
    if not entries:
        raise ConfigError("grid", "needs at least one parameter set")
    device = _device_of(model_fn) if device is None else torch.device(device)
    batch_size = batch_size or default_batch_size(device, amp_dtype)
    if cache is None:
        cache = SegmentationCache()
    image = _hwc(image)
    pixels = to_model_scale(image)[None].to(device)
    trials = []
    for params, (algorithm, segmentation_params, num_samples, kernel_width) in zip(grid, entries):
        started = time.perf_counter()
        segments = cache.segments(image, algorithm, **segmentation_params)
        first, second = (
            _explain_one(
                model_fn,
                image,
                target,
                segments,
                num_samples=num_samples,
                hide_color=hide_color,
                kernel_width=kernel_width,
                num_features=num_features,
                seed=seed,
                batch_size=batch_size,
                distance_metric="cosine",
                device=device,
                amp_dtype=amp_dtype,
            )
            for seed in seeds
        )
        deletion, insertion = deletion_insertion(
            model_fn,
            pixels,
            first.saliency_map[None],
            [target],
            steps=steps,
            baseline=baseline,
            batch_size=batch_size,
            amp_dtype=amp_dtype,
        )
        components = {
            "deletion_auc": float(deletion[0]),
            "insertion_auc": float(insertion[0]),
            "stability": _weight_correlation(first.weights, second.weights),
            "top_k_jaccard": mask_iou(_indicator(first, top_k), _indicator(second, top_k)),
            "n_segments": float(len(first.weights)),
        }
        trials.append(
            LimeTrial(
                params=dict(params),
                objective=float(objective_fn(components)),
                components=components,
                seconds=time.perf_counter() - started,
                result=first,
            )
        )
    best = min(trials, key=lambda trial: trial.objective)
    return LimeSearch(trials=trials, best=best)


# --- internals --------------------------------------------------------------------------------


def _explain_one(
    model_fn,
    image,
    target,
    segments,
    *,
    num_samples,
    hide_color,
    kernel_width,
    num_features,
    seed,
    batch_size,
    distance_metric,
    device,
    amp_dtype,
    adaptive: AdaptiveSettings | None = None,
) -> LimeResult:
    n_segments = int(segments.max()) + 1
    data = perturbation_matrix(n_segments, num_samples, seed)
    hidden = hidden_image(image, segments, hide_color)
    fit = partial(
        fit_explanation,
        segments,
        kernel_width=kernel_width,
        num_features=num_features,
        distance_metric=distance_metric,
    )
    probabilities = partial(
        neighborhood_probabilities,
        model_fn,
        image,
        hidden,
        segments,
        batch_size=batch_size or default_batch_size(device, amp_dtype),
        device=device,
        amp_dtype=amp_dtype,
    )
    if adaptive is None:
        outputs = _checked(probabilities(data), target)
        return fit(data, outputs, target, random_state=np.random.RandomState(seed))
    return _explain_adaptive(data, probabilities, fit, target, seed, adaptive, probabilities.keywords["batch_size"])


def _explain_adaptive(
    data: np.ndarray,
    probabilities: Callable[[np.ndarray], np.ndarray],
    fit: Callable[..., LimeResult],
    target: int,
    seed: int,
    rule: AdaptiveSettings,
    batch_size: int,
) -> LimeResult:
    """Adaptive LIME: the fixed-N path's rows of ``data`` in rounds, lime's ridge refitted after each,
    until :func:`~xai_audit.tasks.explain.lime_convergence.converged` or every row is used.

    A round ends on a whole forward batch (``round_size`` rounded up to a multiple of the batch
    size), so every forward batch is one the fixed-N path runs: a run that reaches the cap
    returns the fixed-N explanation exactly.
    """
    step = -(-rule.round_size // batch_size) * batch_size
    outputs: list[np.ndarray] = []
    history: list[frozenset[int]] = []
    used = 0
    while True:
        end = min(used + step, len(data))
        outputs.append(_checked(probabilities(data[used:end]), target))
        used = end
        result = fit(data[:used], np.concatenate(outputs), target, random_state=np.random.RandomState(seed))
        history.append(top_set(result.weights, rule.top_k))
        done = converged(history, result.weights, result.std_errors, rule)
        if done or used == len(data):
            return replace(result, rounds=len(history), stopped_early=done and used < len(data))


def _checked(probabilities: np.ndarray, target: int) -> np.ndarray:
    if not 0 <= target < probabilities.shape[1]:
        raise ValueError(f"target {target} outside the model's {probabilities.shape[1]} classes")
    return probabilities


def _lime_kernel(distances: np.ndarray, kernel_width: float) -> np.ndarray:
    """lime_image's default exponential kernel."""
    return np.sqrt(np.exp(-(distances**2) / kernel_width**2))


def _hwc(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"LIME takes [H, W, 3] images, got shape {array.shape}")
    return array


def _device_of(model_fn: ModelFn) -> torch.device:
    if isinstance(model_fn, nn.Module):
        parameter = next(model_fn.parameters(), None)
        if parameter is not None:
            return parameter.device
    return torch.device("cpu")


def _search_entry(index: int, entry: Mapping[str, Any]) -> tuple[str, dict[str, Any], int, float]:
    algorithm = entry.get("segmentation", "quickshift")
    if algorithm not in SEGMENTATIONS:
        raise ConfigError(
            f"grid.{index}.segmentation", f"unknown algorithm {algorithm!r}; valid: {', '.join(SEGMENTATIONS)}"
        )
    params = {key: value for key, value in entry.items() if key not in SEARCH_KEYS}
    check_segmentation_params(algorithm, params, where=f"grid.{index}")
    num_samples = int(entry.get("num_samples", 1000))
    if num_samples < 2:
        raise ConfigError(f"grid.{index}.num_samples", f"must be at least 2, got {num_samples}")
    return algorithm, params, num_samples, float(entry.get("kernel_width", 0.25))


def _weight_correlation(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.min() == a.max() or b.min() == b.max():
        return math.nan
    return float(stats.spearmanr(a, b).statistic)


def _indicator(result: LimeResult, k: int) -> np.ndarray:
    chosen = np.zeros(len(result.weights), dtype=bool)
    chosen[result.top_segments(k)] = True
    return chosen


class LimeExplainer(Explainer):
    """LIME: lime's explanation model on batched perturbations, maps scaled to a largest absolute weight of 1.

    One image per :func:`explain_lime` call, so a model that fails on one image fails only that
    image; the scale preserves every ranking.
    """

    methods = ("lime",)
    road = False  # ROAD is grad-cam's metric for CAMs

    def explain(
        self, context: ExplainContext, images: Tensor, targets: Sequence[int], methods: Sequence[str]
    ) -> Explanations:
        settings = context.settings.lime
        model_fn = context.model.pixel_model
        mean, std = model_fn.mean.cpu(), model_fn.std.cpu()
        pixels = [
            ((image.cpu() * std[0] + mean[0]).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            for image in images
        ]
        hide_color = None if settings.hide_color is None else tuple(settings.hide_color)
        cache = SegmentationCache(max_entries=max(1, len(pixels)))
        batch_size = configured_batch_size(settings.batch_size)
        maps = np.full((len(pixels), *pixels[0].shape[:2]), np.nan, dtype=np.float32)
        adaptive = (
            AdaptiveSettings(**settings.adaptive.model_dump(exclude={"enabled"})) if settings.adaptive.enabled else None
        )
        results: dict[int, LimeResult] = {}
        trials: list[dict] = []
        failed: dict[int, ItemError] = {}
        for index, (image, target) in enumerate(zip(pixels, targets)):
            image_id = context.image_ids[index]
            try:
                (result,) = explain_lime(
                    model_fn,
                    [image],
                    [target],
                    segmentation=settings.segmentation,
                    segmentation_params=settings.segmentation_params,
                    num_samples=settings.num_samples,
                    hide_color=hide_color,
                    kernel_width=settings.kernel_width,
                    num_features=settings.num_features,
                    seed=context.seed,
                    batch_size=batch_size,
                    amp_dtype=context.amp_dtype,
                    cache=cache,
                    adaptive=adaptive,
                )
                search = (
                    None
                    if not settings.search.enabled
                    else lime_search(
                        model_fn,
                        image,
                        target,
                        settings.search.grid,
                        seeds=tuple(settings.search.seeds),
                        hide_color=hide_color,
                        num_features=settings.num_features,
                        steps=context.settings.metrics.steps,
                        batch_size=batch_size,
                        amp_dtype=context.amp_dtype,
                        cache=cache,
                    )
                )
            except NonFiniteError as error:
                failed[index] = ItemError(image_id, error.message, error.error_type)
                continue
            maps[index] = result.saliency_map
            results[index] = result
            if search is not None:
                trials += [
                    {
                        "model": context.model.name,
                        "image_id": image_id,
                        "params_json": json.dumps(trial.params, sort_keys=True),
                        "objective": trial.objective,
                        "seconds": trial.seconds,
                        "components_json": json.dumps(trial.components, sort_keys=True),
                        "best": trial is search.best,
                    }
                    for trial in search.trials
                ]
        scale = np.abs(maps).reshape(len(maps), -1).max(axis=1).reshape(-1, 1, 1)
        maps = np.divide(maps, scale, out=np.full_like(maps, np.nan), where=scale > 0)
        maps[(scale == 0).ravel()] = 0.0
        uncertainty = [
            uncertainty_row(context.model.name, context.image_ids[index], result, float(scale.ravel()[index]))
            | {"num_samples": settings.num_samples, "adaptive": adaptive is not None}
            for index, result in results.items()
        ]
        return Explanations({"lime": maps}, failed, {"lime_trials": trials, "lime_uncertainty": uncertainty})


UNCERTAINTY_CAP = float(np.finfo(np.float16).max)
"""The largest stored per-pixel uncertainty (float16's largest value): an error that many times the
map's largest weight (or an infinite one, from a fit on a single sample) says the same: noise."""


def uncertainty_row(model: str, image_id: str, result: LimeResult, scale: float) -> dict[str, Any]:
    """A ``lime_uncertainty`` row: the samples a map used and its weights' standard errors, per superpixel
    (raw) and per pixel (divided by ``scale``, the map's largest absolute weight, as the stored map is;
    capped at :data:`UNCERTAINTY_CAP` so the float16 map stays finite)."""
    std_errors = result.std_errors if result.std_errors is not None else np.full_like(result.weights, np.nan)
    per_pixel = std_errors[result.segments] / scale if scale > 0 else np.zeros(result.segments.shape, np.float32)
    per_pixel = np.minimum(np.nan_to_num(per_pixel, nan=0.0, posinf=UNCERTAINTY_CAP), UNCERTAINTY_CAP)
    return {
        "model": model,
        "image_id": image_id,
        "samples_used": result.samples_used,
        "rounds": result.rounds,
        "stopped_early": result.stopped_early,
        "weights": result.weights.tolist(),
        "std_errors": std_errors.tolist(),
        **encode_map(per_pixel),
    }
