"""Saliency-map metrics: agreement between methods, localization against masks, faithfulness.

Maps are 2-D float arrays of one image's size; larger means more salient. Metrics that treat a
map as a mass (centre of mass, energy) use its non-negative part, so LIME's signed weights and
CAMs in [0, 1] are read alike. A map holding NaN or Inf raises :class:`NonFiniteMapError`
(an :class:`~xai_audit.tasks.core.errors.ItemError`), so a flow records the item instead of writing NaN
metrics. A metric that is undefined for a valid map (the rank correlation of a constant map,
the centre of mass of a map with no positive mass) is NaN, stored as null.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from scipy import integrate, ndimage, stats
from skimage.filters import threshold_otsu
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

from xai_audit.tasks.compute.batch_sizes import perturbation_batch_size
from xai_audit.tasks.compute.inference import inference_model
from xai_audit.tasks.compute.precision import autocast_context
from xai_audit.tasks.core.errors import ConfigError, ItemError

RULES = ("top_q", "otsu")
"""Binarisation rules: the top ``q`` fraction of pixels, or Otsu's threshold."""

BASELINES = ("blur", "mean")
"""What deleted pixels become (deletion) and what insertion starts from."""

POINTING_TOLERANCE_PX = 15
"""The pointing game's tolerance at 224 px (Zhang et al. 2016); see :func:`scaled_tolerance`."""


class NonFiniteMapError(ItemError):
    """A saliency map holds NaN or Inf, so no metric of it means anything."""


def require_finite(saliency_map: np.ndarray, item_id: str = "map") -> np.ndarray:
    """The map as a float64 array; NonFiniteMapError naming ``item_id`` if any value is NaN/Inf."""
    values = np.asarray(saliency_map, dtype=np.float64)
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise NonFiniteMapError(item_id, f"saliency map has {bad} NaN/Inf value(s) of {values.size}")
    return values


# --- agreement -------------------------------------------------------------------------------


def binarize(saliency_map: np.ndarray, rule: str = "top_q", q: float = 0.2) -> np.ndarray:
    """The map's salient pixels as a bool mask.

    ``top_q``: exactly ``round(q * pixels)`` pixels (at least one), the highest values, ties
    going to the earlier pixel in row-major order. ``otsu``: pixels above Otsu's threshold
    (none for a constant map).
    """
    values = require_finite(saliency_map)
    if rule == "top_q":
        if not 0.0 < q <= 1.0:
            raise ConfigError("q", f"must be in (0, 1], got {q}")
        count = max(1, int(round(q * values.size)))
        order = np.argsort(-values.ravel(), kind="stable")
        mask = np.zeros(values.size, dtype=bool)
        mask[order[:count]] = True
        return mask.reshape(values.shape)
    if rule == "otsu":
        if values.min() == values.max():
            return np.zeros(values.shape, dtype=bool)
        return values > threshold_otsu(values)
    raise ConfigError("rule", f"unknown binarisation rule {rule!r}; valid: {', '.join(RULES)}")


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (1.0 when both are empty: they agree)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def map_iou(a: np.ndarray, b: np.ndarray, rule: str = "top_q", q: float = 0.2) -> float:
    """IoU of two maps binarised by the same rule."""
    _same_shape(a, b)
    return mask_iou(binarize(a, rule, q), binarize(b, rule, q))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation over pixels (ties get average ranks); NaN if a map is constant."""
    _same_shape(a, b)
    x, y = require_finite(a, "map a").ravel(), require_finite(b, "map b").ravel()
    if x.min() == x.max() or y.min() == y.max():
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def center_of_mass(saliency_map: np.ndarray) -> tuple[float, float] | None:
    """(row, col) centre of the map's non-negative mass, or None when it has none."""
    mass = np.clip(require_finite(saliency_map), 0.0, None)
    total = mass.sum()
    if total <= 0:
        return None
    rows, cols = np.indices(mass.shape)
    return float((rows * mass).sum() / total), float((cols * mass).sum() / total)


def com_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Distance between the maps' centres of mass over the image diagonal (the seed's heuristic)."""
    _same_shape(a, b)
    ca, cb = center_of_mass(a), center_of_mass(b)
    if ca is None or cb is None:
        return math.nan
    height, width = np.shape(a)
    return float(math.hypot(ca[0] - cb[0], ca[1] - cb[1]) / math.hypot(height, width))


def agreement_rows(maps: Mapping[str, np.ndarray], rule: str = "top_q", q: float = 0.2) -> list[dict]:
    """One ``agreement`` row per method pair (``method_a < method_b``) of one image's maps."""
    rows = []
    for name_a, name_b in itertools.combinations(sorted(maps), 2):
        a, b = maps[name_a], maps[name_b]
        rows.append(
            {
                "method_a": name_a,
                "method_b": name_b,
                "iou": map_iou(a, b, rule, q),
                "spearman": spearman(a, b),
                "com_distance": com_distance(a, b),
                "rule": rule,
                "q": q if rule == "top_q" else None,
            }
        )
    return rows


# --- localization ----------------------------------------------------------------------------


def scaled_tolerance(image_size: int) -> float:
    """The pointing game's 15 px at 224 px, scaled to an image side of ``image_size`` px."""
    return POINTING_TOLERANCE_PX * image_size / 224


def pointing_hit(saliency_map: np.ndarray, gt_mask: np.ndarray, tolerance_px: float) -> bool:
    """The pointing game (Zhang et al. 2016): a hit when a maximal pixel of the map lies within
    ``tolerance_px`` of the mask. On a plateau of maximal pixels (a LIME superpixel) any of them
    counts, as in Quantus' ``PointingGame``: the map does not say which one it points at."""
    mask = _gt(saliency_map, gt_mask)
    values = require_finite(saliency_map)
    distance_to_mask = ndimage.distance_transform_edt(~mask)
    return bool(distance_to_mask[values == values.max()].min() <= tolerance_px)


def iou_gt(saliency_map: np.ndarray, gt_mask: np.ndarray, rule: str = "top_q", q: float = 0.2) -> float:
    """IoU of the binarised map with the ground-truth mask."""
    return mask_iou(binarize(saliency_map, rule, q), _gt(saliency_map, gt_mask))


def energy_in_gt(saliency_map: np.ndarray, gt_mask: np.ndarray) -> float:
    """Share of the map's non-negative mass inside the mask; NaN when the map has no mass."""
    mask = _gt(saliency_map, gt_mask)
    mass = np.clip(require_finite(saliency_map), 0.0, None)
    total = mass.sum()
    if total <= 0:
        return math.nan
    return float(mass[mask].sum() / total)


def localization_row(
    saliency_map: np.ndarray, gt_mask: np.ndarray, tolerance_px: float, rule: str = "top_q", q: float = 0.2
) -> dict:
    """The ``localization`` metrics of one map against one mask."""
    return {
        "pointing_hit": pointing_hit(saliency_map, gt_mask, tolerance_px),
        "iou_gt": iou_gt(saliency_map, gt_mask, rule, q),
        "energy_in_gt": energy_in_gt(saliency_map, gt_mask),
    }


# --- faithfulness ----------------------------------------------------------------------------


def trapezoid_auc(curve: np.ndarray, fractions: np.ndarray | None = None) -> float:
    """Area under a curve sampled at ``fractions`` of [0, 1] (default: evenly spaced)."""
    curve = np.asarray(curve, dtype=np.float64)
    if fractions is None:
        fractions = np.linspace(0.0, 1.0, len(curve))
    return float(integrate.trapezoid(curve, fractions))


def step_pixel_counts(pixels: int, steps: int) -> np.ndarray:
    """Pixel counts of each step, ``round(i * pixels / steps)`` for i = 0..steps."""
    return np.rint(np.linspace(0, pixels, steps + 1)).astype(np.int64)


def baseline_images(images: Tensor, baseline: str, blur_sigma: float | None = None) -> Tensor:
    """What deletion writes and insertion starts from, per image.

    ``mean``: zeros, i.e. the dataset mean colour when images are normalised with that mean.
    ``blur``: a strongly Gaussian-blurred copy, as in RISE's reference code (kernel 11 px,
    sigma 5 px at 224 px), scaled with the image size unless ``blur_sigma`` is given.
    """
    if baseline == "mean":
        return torch.zeros_like(images)
    if baseline == "blur":
        side = max(images.shape[-2:])
        sigma = blur_sigma if blur_sigma is not None else 5.0 * side / 224
        kernel = 2 * math.ceil(sigma) + 1
        kernel = min(kernel, 2 * ((min(images.shape[-2:]) - 1) // 2) + 1)
        return gaussian_blur(images, [kernel, kernel], [sigma, sigma])
    raise ConfigError("baseline", f"unknown baseline {baseline!r}; valid: {', '.join(BASELINES)}")


GPU_METRICS_BATCH_SIZE = 64
"""Deletion/insertion images per forward on accelerators when none is given."""


def deletion_insertion_curves(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    maps: np.ndarray,
    targets: Sequence[int],
    *,
    steps: int = 20,
    baseline: str = "blur",
    batch_size: int | None = None,
    amp_dtype: torch.dtype | None = None,
    blur_sigma: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Target-class probability curves of deletion and insertion (Petsiuk et al. 2018, RISE).

    Pixels are ranked by saliency (ties: earlier pixel first); step ``i`` of ``steps`` has the
    top ``round(i * pixels / steps)`` pixels replaced by the baseline (deletion) or revealed on
    top of it (insertion). All ``2 * (steps + 1)`` images of every input are scored in model
    calls of ``batch_size`` on the images' device (None: :mod:`xai_audit.tasks.compute.batch_sizes`; on GPUs
    :data:`GPU_METRICS_BATCH_SIZE`).

    Returns:
        ``(deletion [B, steps+1], insertion [B, steps+1], fractions [steps+1])`` where
        ``fractions`` are the exact shares of pixels changed at each step.
    """
    maps = np.asarray(maps)
    if images.dim() != 4 or maps.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"maps {maps.shape} do not match images {tuple(images.shape)}")
    if len(targets) != images.shape[0]:
        raise ValueError(f"{len(targets)} targets for {images.shape[0]} images")
    if steps < 1:
        raise ConfigError("steps", f"must be at least 1, got {steps}")
    count, _, height, width = images.shape
    pixels = height * width
    device = images.device
    ranks = np.empty((count, pixels), dtype=np.int64)
    for index, saliency_map in enumerate(maps):
        order = np.argsort(-require_finite(saliency_map, f"maps[{index}]").ravel(), kind="stable")
        ranks[index, order] = np.arange(pixels)
    ranks_t = torch.from_numpy(ranks).to(device)
    counts = step_pixel_counts(pixels, steps)
    counts_t = torch.from_numpy(counts).to(device)
    base = baseline_images(images, baseline, blur_sigma)
    target_t = torch.as_tensor(list(targets), device=device)

    # Job j: image j // (2 (steps+1)), curve (deletion 0 / insertion 1), step.
    per_image = 2 * (steps + 1)
    probabilities = torch.empty(count * per_image, dtype=torch.float32)
    batch_size = batch_size or perturbation_batch_size(device, amp_dtype, accelerator=GPU_METRICS_BATCH_SIZE)
    model = inference_model(model, images)
    with torch.no_grad():
        for start in range(0, count * per_image, batch_size):
            jobs = torch.arange(start, min(start + batch_size, count * per_image), device=device)
            image, rest = jobs // per_image, jobs % per_image
            insertion, step = rest // (steps + 1), rest % (steps + 1)
            changed = ranks_t[image] < counts_t[step][:, None]
            show_base = (changed ^ insertion.bool()[:, None]).view(-1, 1, height, width)
            batch = torch.where(show_base, base[image], images[image]).contiguous(memory_format=torch.channels_last)
            with autocast_context(device, amp_dtype):
                logits = model(batch)
            probs = torch.softmax(logits.float(), dim=-1)
            probabilities[start : start + len(jobs)] = probs.gather(1, target_t[image][:, None])[:, 0].cpu()
    curves = probabilities.view(count, 2, steps + 1).numpy().astype(np.float64)
    return curves[:, 0], curves[:, 1], counts / pixels


def deletion_insertion(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    maps: np.ndarray,
    targets: Sequence[int],
    *,
    steps: int = 20,
    baseline: str = "blur",
    batch_size: int | None = None,
    amp_dtype: torch.dtype | None = None,
    blur_sigma: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion AUC per image (lower deletion, higher insertion = more faithful).

    Args:
        model: maps a batch ``[N, 3, H, W]`` of model inputs to logits ``[N, classes]``.
        images: normalised model inputs ``[B, 3, H, W]``; the ``mean`` baseline is zeros here,
            which is the dataset mean colour.
        maps: ``[B, H, W]`` saliency, one per image.
        targets: the class whose softmax probability each curve follows.
        steps: equal pixel-count steps from nothing to everything changed.
        baseline: ``blur`` or ``mean`` (see :func:`baseline_images`).
        batch_size: images per model call (all curves of all images share the calls); None: by
            device and precision.
        amp_dtype: autocast dtype for the model calls, or None for full precision.

    Returns:
        ``(deletion_auc [B], insertion_auc [B])``, trapezoid areas over the pixel fraction axis.
    """
    deletion, insertion, fractions = deletion_insertion_curves(
        model,
        images,
        maps,
        targets,
        steps=steps,
        baseline=baseline,
        batch_size=batch_size,
        amp_dtype=amp_dtype,
        blur_sigma=blur_sigma,
    )
    return (
        np.array([trapezoid_auc(curve, fractions) for curve in deletion]),
        np.array([trapezoid_auc(curve, fractions) for curve in insertion]),
    )


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if np.shape(a) != np.shape(b):
        raise ValueError(f"maps differ in shape: {np.shape(a)} vs {np.shape(b)}")


def _gt(saliency_map: np.ndarray, gt_mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(gt_mask, dtype=bool)
    if mask.shape != np.shape(saliency_map):
        raise ValueError(f"mask shape {mask.shape} differs from map shape {np.shape(saliency_map)}")
    if not mask.any():
        raise ItemError("gt_mask", "ground-truth mask is empty")
    return mask
