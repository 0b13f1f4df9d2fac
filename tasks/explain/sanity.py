"""Sanity checks of explanation methods: do their maps depend on the model's weights?

Adebayo et al. (NeurIPS 2018, "Sanity checks for saliency maps") randomise a trained model's
weights block by block, from the output layer down ("cascading"), and compare each step's map
with the trained model's: a map that barely changes explains the image, not the model.
Hedström et al. (2024, "Sanity checks revisited") add two variants, which Quantus implements
as ``SmoothMPRT`` and ``EfficientMPRT``: *smprt* randomises bottom-up and averages each map over
noisy copies of the input (the last copy noise-free) before comparing; *emprt* compares only
the trained and the fully randomised model, by the relative rise of the map's discrete entropy
(a 100-bin histogram of its values). The *random logit* test (Sixt et al.; Quantus'
``RandomLogit``) compares the map of the explained class with the map of a random other class.

Randomisation follows Quantus' torch model interface: a module is randomised by its own
``reset_parameters()`` (convolutions and linear layers re-drawn from their initialisation,
BatchNorm set to weight 1, bias 0 and fresh running statistics) under a seed. Here each block
gets the seed ``config seed + its position in the model``, so the fully randomised model is the
same whichever order the blocks were reset in, and each step's model is built once (a copy of
the previous step's) and shared by every method. Similarities follow Quantus' MPRT defaults:
absolute values scaled to a maximum of 1, then Spearman rank correlation, SSIM
(scikit-image, data range 1) and the IoU of the top ``explain.metrics.agreement_q`` pixels.

Every row stores its map (float16, as the ``saliency`` table), and every similarity is computed
from the stored maps, so recomputing it from the ``sanity`` table gives the stored value.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from scipy import stats
from skimage.metrics import structural_similarity
from torch import nn

from xai_audit.storage.maps import decode_map, encode_map
from xai_audit.storage.parquet import safe_name
from xai_audit.tasks.compute.precision import amp_dtype as precision_dtype
from xai_audit.tasks.core.config import AuditConfig, ModelConfig, SanityConfig
from xai_audit.tasks.core.errors import ItemError
from xai_audit.tasks.core.progress import step as progress_step
from xai_audit.tasks.core.rows import error_row
from xai_audit.tasks.explain.base import ExplainContext
from xai_audit.tasks.explain.registry import families
from xai_audit.tasks.explain.stage import cam_layer_name, explain_family, load_inputs, predict
from xai_audit.tasks.metrics.maps import map_iou, spearman

TESTS = ("cascading", "smprt", "emprt", "random_logit")
"""The sanity tests (``explain.sanity.tests``)."""

SANITY_TABLES = ("sanity", "errors")
"""Tables one model's sanity unit writes (``errors`` last, so the unit counts as done once it exists)."""

Maps = dict[str, np.ndarray]
"""``{method: float32 [B, H, W]}`` as stored (float16-rounded)."""


def sanity_unit(model: str) -> str:
    """The deterministic work-unit name of a model's sanity checks."""
    return f"{safe_name(model)}-sanity"


# --- randomised models -----------------------------------------------------------------------


def randomisation_blocks(module: nn.Module, granularity: str = "blocks") -> list[tuple[str, list[str]]]:
    """The model's randomisation steps in forward (bottom-up) order: ``(name, [qualified names of
    the modules it resets])``.

    ``modules``: every module with ``reset_parameters`` on its own (Quantus' steps). ``blocks``:
    the model's children, with containers (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``)
    opened, so a ResNet's steps are conv1, bn1, each residual block and fc.
    """
    if granularity == "modules":
        return [(name, [name]) for name, child in module.named_modules() if name and hasattr(child, "reset_parameters")]
    if granularity != "blocks":
        raise ValueError(f"unknown granularity {granularity!r}; valid: blocks, modules")
    blocks: list[tuple[str, list[str]]] = []

    def visit(prefix: str, parent: nn.Module) -> None:
        for name, child in parent.named_children():
            qualified = f"{prefix}{name}"
            if isinstance(child, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
                visit(f"{qualified}.", child)
                continue
            resettable = [
                f"{qualified}.{inner}" if inner else qualified
                for inner, part in child.named_modules()
                if hasattr(part, "reset_parameters")
            ]
            if resettable:
                blocks.append((qualified, resettable))

    visit("", module)
    return blocks


def randomise(module: nn.Module, names: Sequence[str], seed: int) -> None:
    """Reset the named submodules of ``module`` in place, drawing from their initialisers under ``seed``
    (the global generators are restored afterwards)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        with torch.no_grad():
            for name in names:
                module.get_submodule(name).reset_parameters()


def cascade(
    module: nn.Module, blocks: Sequence[tuple[str, list[str]]], seed: int, order: str = "top_down"
) -> Iterator[tuple[int, str, nn.Module]]:
    """``(step, block, model)`` with one more block randomised at each step, cumulatively: from the output
    layer down (``top_down``, Adebayo et al.'s cascade) or from the input up (``bottom_up``, sMPRT).

    Each step's model is a copy of the previous step's (the trained ``module`` is left as it is), in
    eval mode; block ``i`` (forward order) is always randomised with seed ``seed + i``.
    """
    indexed = list(enumerate(blocks))
    if order == "top_down":
        indexed.reverse()
    elif order != "bottom_up":
        raise ValueError(f"unknown order {order!r}; valid: top_down, bottom_up")
    current = module
    for step, (index, (name, names)) in enumerate(indexed, start=1):
        current = copy.deepcopy(current)
        randomise(current, names, seed + index)
        current.eval()
        yield step, name, current


def fully_randomised(module: nn.Module, blocks: Sequence[tuple[str, list[str]]], seed: int) -> nn.Module:
    """A copy of ``module`` with every block randomised (the last step of either cascade)."""
    randomised = copy.deepcopy(module)
    for index, (_, names) in enumerate(blocks):
        randomise(randomised, names, seed + index)
    return randomised.eval()


# --- similarities ----------------------------------------------------------------------------


def scaled_abs(saliency_map: np.ndarray) -> np.ndarray:
    """Absolute values over their maximum (Quantus' ``abs`` and ``normalise_by_max``); zeros stay zeros."""
    values = np.abs(np.asarray(saliency_map, dtype=np.float64))
    peak = values.max()
    return values / peak if peak > 0 else values


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """scikit-image's SSIM of two maps in [0, 1] (window 7, or the largest odd side that fits)."""
    side = min(a.shape)
    window = min(7, side if side % 2 else side - 1)
    return float(structural_similarity(a, b, data_range=1.0, win_size=window))


def similarities(reference: np.ndarray, other: np.ndarray, q: float) -> dict[str, float]:
    """How alike two maps are after :func:`scaled_abs`: Spearman, SSIM and top-``q`` IoU."""
    a, b = scaled_abs(reference), scaled_abs(other)
    return {"spearman": spearman(a, b), "ssim": ssim(a, b), "iou": map_iou(a, b, "top_q", q)}


def map_entropy(saliency_map: np.ndarray, bins: int = 100) -> float:
    """Quantus' ``discrete_entropy``: Shannon entropy (nats) of a ``bins``-bin histogram of the map's values."""
    histogram, _ = np.histogram(np.asarray(saliency_map, dtype=np.float64), bins=bins)
    return float(stats.entropy(histogram))


def stored(maps: np.ndarray) -> np.ndarray:
    """Maps as the ``sanity`` table stores them (float16-rounded), so similarities recompute exactly."""
    return np.stack([decode_map(encode_map(m)) for m in maps])


# --- the checks of one model -----------------------------------------------------------------


@dataclasses.dataclass
class _Checked:
    """The explained images and what the checks share: how to explain them with any copy of the model."""

    config: AuditConfig
    model: object
    layer_name: str
    images: torch.Tensor
    targets: list[int]
    image_ids: list[str]
    methods: list[str]
    rows: list[dict] = dataclasses.field(default_factory=list)
    errors: list[dict] = dataclasses.field(default_factory=list)

    @property
    def settings(self) -> SanityConfig:
        return self.config.explain.sanity

    def explain(self, module: nn.Module, images: torch.Tensor | None = None, targets: list[int] | None = None) -> Maps:
        """Every checked method's stored maps of the images with ``module`` in the model's place; a method
        that raises gets an ``errors`` row and no maps."""
        model = dataclasses.replace(self.model, module=module)
        layer = module.get_submodule(self.layer_name)
        amp_dtype = precision_dtype(self.config.explain.precision, next(module.parameters()).device)
        images = self.images if images is None else images
        targets = self.targets if targets is None else targets
        batch_size = self.config.explain.batch_size
        parts: dict[str, list[np.ndarray]] = {}
        failed: set[str] = set()
        for start in range(0, len(targets), batch_size):
            ids = self.image_ids[start : start + batch_size]
            context = ExplainContext(model, layer, self.config.explain, self.config.seed, amp_dtype, ids)
            batch, batch_targets = images[start : start + batch_size], targets[start : start + batch_size]
            for family, methods in families(self.methods):
                for explained, method_errors in explain_family(family, context, batch, batch_targets, methods):
                    for method, maps in explained.maps.items():
                        parts.setdefault(method, []).append(np.asarray(maps, dtype=np.float32))
                    for method, error in method_errors.items():
                        failed.add(method)
                        described = ItemError(method, f"{method} failed: {type(error).__name__}: {error}")
                        self.errors.append(error_row("sanity", self.model.name, described))
        return {method: stored(np.concatenate(maps)) for method, maps in parts.items() if method not in failed}

    def smoothed(self, module: nn.Module) -> Maps:
        """sMPRT's maps: the mean over ``smprt_samples`` noisy copies of the images (noise std
        ``smprt_noise`` times each input's value range; the last copy noise-free), the same noise at every step."""
        samples, noise = self.settings.smprt_samples, self.settings.smprt_noise
        span = self.images.amax(dim=(1, 2, 3), keepdim=True) - self.images.amin(dim=(1, 2, 3), keepdim=True)
        generator = torch.Generator().manual_seed(self.config.seed)
        total: dict[str, np.ndarray] = {}
        for sample in range(samples):
            epsilon = torch.randn(self.images.shape, generator=generator).to(self.images.device) * noise * span
            noisy = self.images if sample == samples - 1 else self.images + epsilon
            for method, maps in self.explain(module, noisy).items():
                total[method] = total.get(method, 0) + maps.astype(np.float64) / samples
        return {method: stored(maps.astype(np.float32)) for method, maps in total.items()}

    def add(self, test: str, step: int, layer: str | None, maps: Maps, reference: Maps, targets: list[int]) -> None:
        """Rows of one step of one test: each map with its similarities to the test's reference map."""
        q, bins = self.config.explain.metrics.agreement_q, self.settings.emprt_bins
        for method, method_maps in maps.items():
            if method not in reference:
                continue
            for index, image_id in enumerate(self.image_ids):
                saliency_map, reference_map = method_maps[index], reference[method][index]
                finite = bool(np.isfinite(saliency_map).all() and np.isfinite(reference_map).all())
                # A randomised model can leave a method nothing to scale (AblationCAM divides by a zero
                # maximum): that is the method's answer, stored with null similarities, not a failed item.
                measured = (
                    {**similarities(reference_map, saliency_map, q), "entropy": map_entropy(saliency_map, bins)}
                    if finite
                    else dict.fromkeys(("spearman", "ssim", "iou", "entropy"))
                )
                self.rows.append(
                    {
                        "model": self.model.name,
                        "method": method,
                        "test": test,
                        "step": step,
                        "layer": layer,
                        "image_id": image_id,
                        "target": targets[index],
                        **measured,
                        **encode_map(saliency_map),
                    }
                )


def other_classes(targets: Sequence[int], n_classes: int, seed: int) -> list[int]:
    """A random class other than each target (seeded), for the random-logit test."""
    rng = np.random.default_rng(seed)
    return [int((target + rng.integers(1, n_classes)) % n_classes) for target in targets]


def sanity_rows(
    config: AuditConfig,
    model_config: ModelConfig,
    model,
    records: list[dict],
) -> dict[str, list[dict]]:
    """The ``sanity`` and ``errors`` rows of one model (a :class:`xai_audit.tasks.data.models.LoadedModel`) on
    the first ``explain.sanity.images`` of ``records``: every configured test for every checked method."""
    settings, explain = config.explain.sanity, config.explain
    inputs, errors = load_inputs(model, records[: settings.images], explain.target, with_masks=False)
    for row in errors:
        row["stage"] = "sanity"
    if not inputs:
        return {"sanity": [], "errors": errors}
    device = next(model.module.parameters()).device
    images = torch.stack([item.pixels for item in inputs]).to(device)
    model.module.eval()
    logits = predict(model.module, images, precision_dtype(explain.precision, device))
    label_targets = [item.true_label for item in inputs] if explain.target == "label" else None
    checked = _Checked(
        config,
        model,
        cam_layer_name(model_config, model),
        images,
        label_targets or logits.argmax(dim=-1).tolist(),
        [item.record["image_id"] for item in inputs],
        list(settings.methods or explain.methods),
    )
    checked.errors += errors
    blocks = randomisation_blocks(model.module, settings.granularity)
    tests = settings.tests
    trained = checked.explain(model.module)
    randomised: Maps | None = None
    if "cascading" in tests:
        checked.add("cascading", 0, None, trained, trained, checked.targets)
        for step, block, module in cascade(model.module, blocks, config.seed, "top_down"):
            progress_step("sanity %s: cascading step %d/%d (%s randomised)", model.name, step, len(blocks), block)
            randomised = checked.explain(module)
            checked.add("cascading", step, block, randomised, trained, checked.targets)
    if "emprt" in tests:
        if randomised is None:  # the cascade's last model is the fully randomised one: its maps serve eMPRT too
            progress_step("sanity %s: emprt (fully randomised model)", model.name)
            randomised = checked.explain(fully_randomised(model.module, blocks, config.seed))
        checked.add("emprt", 0, None, trained, trained, checked.targets)
        checked.add("emprt", len(blocks), "all", randomised, trained, checked.targets)
    if "smprt" in tests:
        smooth = checked.smoothed(model.module)
        checked.add("smprt", 0, None, smooth, smooth, checked.targets)
        for step, block, module in cascade(model.module, blocks, config.seed, "bottom_up"):
            progress_step("sanity %s: smprt step %d/%d (%s randomised)", model.name, step, len(blocks), block)
            checked.add("smprt", step, block, checked.smoothed(module), smooth, checked.targets)
    if "random_logit" in tests and logits.shape[-1] > 1:
        others = other_classes(checked.targets, logits.shape[-1], config.seed)
        checked.add("random_logit", 0, None, trained, trained, checked.targets)
        checked.add("random_logit", 1, None, checked.explain(model.module, targets=others), trained, others)
    return {"sanity": checked.rows, "errors": checked.errors}
