"""Class activation maps through the grad-cam package, every gradient CAM of a chunk from one pass.

grad-cam's ``BaseCAM.__call__`` runs its own forward and backward for every method. Here one
forward (which also yields the logits for the predictions) and one backward (from the targets'
logits down to the target layer only) capture the layer's activations and gradients; each
method then combines those same tensors with its library class's own ``compute_cam_per_layer``
and ``aggregate_multi_layers``, so its formula, ReLU and ``scale_cam_image`` scaling are
grad-cam's, not a copy. ScoreCAM and AblationCAM need perturbation forwards of their own; they
run through grad-cam subclasses that change how those forwards are batched, not what they
compute.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from pytorch_grad_cam import (
    AblationCAM,
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.ablation_layer import AblationLayer, AblationLayerVit
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.find_layers import replace_layer_recursive
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from xai_audit.tasks.compute.batch_sizes import configured_batch_size, perturbation_batch_size
from xai_audit.tasks.compute.inference import inference_model
from xai_audit.tasks.compute.memory_format import channels_last_weights
from xai_audit.tasks.compute.precision import FP32_ON_CPU, FP32_UNDER_AUTO, amp_dtype, autocast_context
from xai_audit.tasks.core.errors import ConfigError
from xai_audit.tasks.explain.base import ExplainContext, Explainer, Explanations
from xai_audit.tasks.explain.groupcam import GroupCAM

GPU_SCORECAM_BATCH_SIZE = 64
"""ScoreCAM's masked images per forward on accelerators when none is given (measured on an H200)."""


class BatchedScoreCAM(ScoreCAM):
    """grad-cam's ScoreCAM with its masked-input forwards built lazily and deduplicated.

    The weights are the library's: softmax over channels of the target score of the input
    multiplied by each channel's min-max normalised, bilinearly upsampled activation. What
    differs: masks and masked inputs exist for one image and one inner batch at a time (the
    library materialises all ``B x C`` masked inputs at once), a mask bit-identical to an
    earlier one of the same image (every dead channel gives the all-zero mask) is scored once,
    the masked inputs are channels-last and go through the model's inference copy (BatchNorm
    folded, channels-last packed weights, no hooks: :mod:`xai_audit.tasks.compute.inference`; scores move by
    ~1e-6), the inner batch suits the device (``None``: :mod:`xai_audit.tasks.compute.batch_sizes`) and the
    forwards may run under autocast.

    ``channels`` (``explain.scorecam_channels``) puts ScoreCAM on a budget, as Faster Score-CAM
    does (tabayashi0117/Score-CAM: "use only channels with large variances as mask images",
    ``max_N``; ~10x faster on VGG16, it reports): per image only the ``channels`` channels whose
    activation map has the largest spatial variance are masked and scored, the softmax runs over
    those scores alone, and every other channel gets weight 0. ``None`` (or at least every
    channel): full ScoreCAM, exactly the library's.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layers: list[nn.Module],
        reshape_transform: Callable | None = None,
        batch_size: int | None = None,
        amp_dtype: torch.dtype | None = None,
        channels: int | None = None,
    ) -> None:
        super().__init__(model, target_layers, reshape_transform=reshape_transform)
        self.batch_size = batch_size
        self.amp_dtype = amp_dtype
        self.channels = channels

    def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
        upsample = nn.UpsamplingBilinear2d(size=input_tensor.shape[-2:])
        scores = torch.empty(activations.shape[:2], dtype=torch.float32)
        model = inference_model(self.model, input_tensor)
        batch_size = self.batch_size or perturbation_batch_size(
            self.device, self.amp_dtype, accelerator=GPU_SCORECAM_BATCH_SIZE
        )
        with torch.no_grad():
            for image, target in enumerate(targets):
                upsampled = upsample(torch.from_numpy(activations[image : image + 1]).to(self.device))
                flat = upsampled.view(upsampled.size(0), upsampled.size(1), -1)
                maxs = flat.max(dim=-1)[0][:, :, None, None]
                mins = flat.min(dim=-1)[0][:, :, None, None]
                masks = ((upsampled - mins) / (maxs - mins + 1e-8))[0]
                chosen = budget_channels(activations[image], self.channels)
                if chosen is not None:
                    masks = masks[chosen.to(masks.device)]
                distinct, reuse = _distinct_masks(masks)
                distinct_scores = torch.empty(len(distinct), dtype=torch.float32)
                for start in range(0, len(distinct), batch_size):
                    channels = torch.as_tensor(distinct[start : start + batch_size], device=self.device)
                    batch = input_tensor[image][None] * masks[channels][:, None]
                    if batch.dim() == 4:
                        batch = batch.contiguous(memory_format=torch.channels_last)
                    with autocast_context(self.device, self.amp_dtype):
                        outputs = model(batch)
                    distinct_scores[start : start + len(channels)] = target(outputs.float()).cpu()
                if chosen is None:
                    scores[image] = distinct_scores[torch.from_numpy(reuse)]
                else:  # unscored channels: -inf, so the softmax gives them weight 0
                    scores[image] = -torch.inf
                    scores[image, chosen] = distinct_scores[torch.from_numpy(reuse)]
        return torch.nn.Softmax(dim=-1)(scores).numpy()


def budget_channels(activations: np.ndarray, channels: int | None) -> Tensor | None:
    """The ``channels`` channels of one image's activations ``[C, h, w]`` with the largest spatial
    variance (Faster Score-CAM's choice; ties: lower index first); None when the budget covers them all."""
    if channels is None or channels >= activations.shape[0]:
        return None
    variance = torch.from_numpy(activations).reshape(activations.shape[0], -1).double().var(dim=1)
    order = torch.sort(-variance, stable=True).indices  # a stable sort keeps tied channels in index order
    return order[:channels].sort().values


class BatchedAblationCAM(AblationCAM):
    """grad-cam's AblationCAM without recomputing the layers before the target layer, where that is exact.

    The library swaps the target layer for an ``AblationLayer`` that ignores its input and
    returns the cached activations with some channels ablated, yet it feeds the network
    ``batch_size`` copies of the image, so everything before the target layer runs once per
    ablated channel and is thrown away. The shortcut here: the network is fed one copy, and the
    ablation layer's output (one row per ablated channel) carries the batch through the rest of
    the network (with channels-last weights, as in ScoreCAM). Weights, ablation values and inner
    batching are the library's.

    The shortcut is exact only if what runs after the target layer meets earlier tensors by
    broadcasting (true for CNN blocks and transformer residual streams when the target is a whole
    block); a forward that reshapes with the input's batch size breaks it. So once per model and
    layer, on the first image and :data:`CHECK_CHANNELS` channels in fp32, the shortcut's scores
    are compared with the library's procedure (one copy of the image per ablated channel); where
    they differ or the shortcut raises, this model and layer use the library's procedure, and the
    log says so.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layers: list[nn.Module],
        reshape_transform: Callable | None = None,
        batch_size: int = 128,
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(model, target_layers, reshape_transform=reshape_transform, batch_size=batch_size)
        # The library's default ablation layer is one module shared by every AblationCAM. Token and
        # channels-last layers (those with a reshape transform) ablate their last axis, as grad-cam's
        # ViT example does with AblationLayerVit.
        self.ablation_layer = AblationLayer() if reshape_transform is None else AblationLayerVit()
        self.amp_dtype = amp_dtype

    def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
        checked = _SHORTCUT_EXACT.setdefault(self.model, {})
        if id(target_layer) not in checked:
            checked[id(target_layer)] = self._shortcut_is_exact(input_tensor, target_layer, targets, activations)
        return self.ablation_weights(
            input_tensor, target_layer, targets, activations, copies=not checked[id(target_layer)]
        )

    def _shortcut_is_exact(self, input_tensor, target_layer, targets, activations) -> bool:
        saved = self.ratio_channels_to_ablate, self.amp_dtype
        self.ratio_channels_to_ablate = min(1.0, CHECK_CHANNELS / activations.shape[1])
        self.amp_dtype = None
        first = (input_tensor[:1], target_layer, targets[:1], activations[:1])
        try:
            library = self.ablation_weights(*first, copies=True)
            try:
                shortcut = self.ablation_weights(*first, copies=False)
            except Exception as error:  # noqa: BLE001 - any failure of the shortcut means: do not take it
                reason = f"it raises {type(error).__name__}: {error}"
            else:
                scale = float(np.abs(library).max()) or 1.0
                if np.allclose(shortcut, library, rtol=1e-4, atol=1e-5 * scale):
                    return True
                reason = f"its weights differ by up to {float(np.abs(shortcut - library).max()):.3g}"
        finally:
            self.ratio_channels_to_ablate, self.amp_dtype = saved
        logging.getLogger(__name__).warning(
            "AblationCAM on %s: feeding one copy of the image is not exact here (%s); ablating with one copy "
            "per channel, as grad-cam does",
            type(self.model).__name__,
            reason,
        )
        return False

    def ablation_weights(self, input_tensor, target_layer, targets, activations, copies: bool) -> np.ndarray:
        """The library's AblationCAM weights, feeding one copy of each image (``copies=False``: the
        shortcut) or one copy per ablated channel (``copies=True``: the library's procedure)."""
        handle = target_layer.register_forward_hook(self.save_activation)
        with torch.no_grad(), autocast_context(self.device, self.amp_dtype):
            outputs = self.model(input_tensor).float()
            handle.remove()
            original_scores = np.float32([target(output).cpu().item() for target, output in zip(targets, outputs)])

        ablation_layer = self.ablation_layer
        replace_layer_recursive(self.model, target_layer, ablation_layer)
        number_of_channels = activations.shape[1]
        weights = []
        try:
            with torch.no_grad(), channels_last_weights(self.model):
                for batch_index, (target, tensor) in enumerate(zip(targets, input_tensor)):
                    new_scores = []
                    channels_to_ablate = ablation_layer.activations_to_be_ablated(
                        activations[batch_index, :], self.ratio_channels_to_ablate
                    )
                    number_channels_to_ablate = len(channels_to_ablate)
                    for i in range(0, number_channels_to_ablate, self.batch_size):
                        count = min(self.batch_size, number_channels_to_ablate - i)
                        ablation_layer.set_next_batch(
                            input_batch_index=batch_index, activations=self.activations, num_channels_to_ablate=count
                        )
                        fed = tensor[None].repeat(count, 1, 1, 1) if copies else tensor[None]
                        with autocast_context(self.device, self.amp_dtype):
                            scores = target(self.model(fed).float())
                        new_scores.extend(scores.cpu().tolist())
                        ablation_layer.indices = ablation_layer.indices[count:]
                    weights.extend(
                        self.assemble_ablation_scores(
                            new_scores, original_scores[batch_index], channels_to_ablate, number_of_channels
                        )
                    )
        finally:
            replace_layer_recursive(self.model, ablation_layer, target_layer)

        weights = np.float32(weights).reshape(activations.shape[:2])
        original_scores = original_scores[:, None]
        return (original_scores - weights) / original_scores


CHECK_CHANNELS = 16
"""Channels the once-per-model AblationCAM shortcut check ablates (one forward of each procedure)."""
_SHORTCUT_EXACT: weakref.WeakKeyDictionary[nn.Module, dict[int, bool]] = weakref.WeakKeyDictionary()
"""model -> {id(target layer): whether AblationCAM's one-copy shortcut is exact there}."""


CAM_METHODS: dict[str, type[BaseCAM]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "hirescam": HiResCAM,
    "eigencam": EigenCAM,
    "scorecam": BatchedScoreCAM,
    "ablationcam": BatchedAblationCAM,
    "groupcam": GroupCAM,
}
"""Config name -> grad-cam class (ScoreCAM and AblationCAM: the batched subclasses above; Group-CAM:
:mod:`xai_audit.tasks.explain.groupcam`, a BaseCAM subclass of ours, as no library ships it)."""


def forward_with_cams(
    model: nn.Module,
    target_layer: nn.Module,
    images: Tensor,
    targets: Sequence[int] | None,
    methods: Sequence[str],
    *,
    scorecam_batch_size: int | None = None,
    ablationcam_batch_size: int = 128,
    reshape_transform: Callable[[Tensor], Tensor] | None = None,
    amp_dtype: torch.dtype | None = None,
    scorecam_channels: int | None = None,
    groupcam_groups: int = 32,
) -> tuple[Tensor, dict[str, np.ndarray]]:
    """The logits of a batch and its CAMs, every gradient-based CAM from one forward/backward pass.

    Args:
        model: a classifier returning logits ``[B, classes]``; put in eval mode, as grad-cam does.
        target_layer: the module whose output the CAMs read (called once per forward).
        images: preprocessed model inputs ``[B, 3, H, W]`` (moved to the model's device).
        targets: the class explained for each image; ``None``: each image's top-1 prediction.
        methods: names from :data:`CAM_METHODS`.
        scorecam_batch_size: masked inputs per forward for ScoreCAM (library: 16); None: by device
            and precision (:mod:`xai_audit.tasks.compute.batch_sizes`; on GPUs :data:`GPU_SCORECAM_BATCH_SIZE`).
        ablationcam_batch_size: ablated channels per forward for AblationCAM (library: 32; only
            the layers after the target layer see the batch, so 128 is ~4x faster on CPU).
        reshape_transform: grad-cam's hook for non-CNN layers (``[B, tokens, C] -> [B, C, h, w]``).
        amp_dtype: run forwards under autocast with this dtype (``torch.bfloat16``/``float16``).
        scorecam_channels: ScoreCAM's channel budget (:class:`BatchedScoreCAM`); None: every channel.
        groupcam_groups: Group-CAM's channel groups (:class:`xai_audit.tasks.explain.groupcam.GroupCAM`).

    The backward runs only when a method's grad-cam class ``uses_gradients``.

    Returns:
        ``(logits [B, classes] float32, {method: float32 [B, H, W] maps in [0, 1]})``; each map
        equals what grad-cam's class of that name returns for the same model, layer, input and
        ``ClassifierOutputTarget`` (ScoreCAM on a channel budget and Group-CAM: see their classes).
    """
    options = {
        BatchedScoreCAM: {"batch_size": scorecam_batch_size, "amp_dtype": amp_dtype, "channels": scorecam_channels},
        BatchedAblationCAM: {"batch_size": ablationcam_batch_size, "amp_dtype": amp_dtype},
        GroupCAM: {"batch_size": scorecam_batch_size, "amp_dtype": amp_dtype, "groups": groupcam_groups},
    }
    cams = {
        name: _cam(cam_class(name), model, target_layer, reshape_transform, options.get(cam_class(name), {}))
        for name in methods
    }
    model.eval()
    device = next(model.parameters()).device
    images = images.to(device)
    need_grads = any(cam.uses_gradients for cam in cams.values())
    logits, activations, gradients = capture_layer(
        model, target_layer, images, targets, need_grads, reshape_transform, amp_dtype
    )
    if targets is None:
        targets = logits.argmax(dim=-1).tolist()
    if len(targets) != images.shape[0]:
        raise ValueError(f"{len(targets)} targets for {images.shape[0]} images")
    target_objects = [ClassifierOutputTarget(int(t)) for t in targets]

    maps: dict[str, np.ndarray] = {}
    for name, cam in cams.items():
        cam.activations_and_grads = _Captured(activations, gradients)
        per_layer = cam.compute_cam_per_layer(images, target_objects, eigen_smooth=False)
        maps[name] = cam.aggregate_multi_layers(per_layer)
    return logits, maps


def compute_cams(
    model: nn.Module,
    target_layer: nn.Module,
    images: Tensor,
    targets: Sequence[int] | None,
    methods: Sequence[str],
    *,
    scorecam_batch_size: int | None = None,
    ablationcam_batch_size: int = 128,
    reshape_transform: Callable[[Tensor], Tensor] | None = None,
    amp_dtype: torch.dtype | None = None,
    scorecam_channels: int | None = None,
    groupcam_groups: int = 32,
) -> dict[str, np.ndarray]:
    """CAMs of a batch, ``{method: float32 [B, H, W] in [0, 1]}``; see :func:`forward_with_cams`."""
    return forward_with_cams(
        model,
        target_layer,
        images,
        targets,
        methods,
        scorecam_batch_size=scorecam_batch_size,
        ablationcam_batch_size=ablationcam_batch_size,
        reshape_transform=reshape_transform,
        amp_dtype=amp_dtype,
        scorecam_channels=scorecam_channels,
        groupcam_groups=groupcam_groups,
    )[1]


def cam_class(name: str) -> type[BaseCAM]:
    """The grad-cam class of a config name; ConfigError naming the valid ones otherwise."""
    try:
        return CAM_METHODS[name]
    except KeyError:
        raise ConfigError("methods", f"unknown CAM method {name!r}; valid: {', '.join(sorted(CAM_METHODS))}") from None


def _cam(cls, model, target_layer, reshape_transform, options: dict[str, Any]):
    """A grad-cam object of ``cls`` whose own hooks are removed: it only combines and scales."""
    cam = cls(model, [target_layer], reshape_transform=reshape_transform, **options)
    cam.activations_and_grads.release()
    return cam


class _Captured:
    """Stands in for grad-cam's ActivationsAndGradients, holding tensors captured elsewhere."""

    def __init__(self, activations: Tensor, gradients: Tensor | None) -> None:
        self.activations = [activations]
        self.gradients = [] if gradients is None else [gradients]

    def release(self) -> None:
        self.activations, self.gradients = [], []


def capture_layer(
    model: nn.Module,
    target_layer: nn.Module,
    images: Tensor,
    targets: Sequence[int] | None,
    need_grads: bool,
    reshape_transform: Callable[[Tensor], Tensor] | None = None,
    amp_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Logits, target-layer activations and (optionally) d(target logit)/d(activations), on CPU.

    The layers before the target layer run without autograd; the hook switches it on for the
    rest of the network, and the backward stops at the target layer: the gradients equal
    those of grad-cam's full ``loss.backward()`` at that layer, for a fraction of the work.
    """
    captured: dict[str, Tensor] = {}

    def hook(module, inputs, output):
        if not need_grads:
            captured["activations"] = output
            return None
        torch.set_grad_enabled(True)
        leaf = output.detach().requires_grad_(True)
        captured["activations"] = leaf
        # A clone, so an in-place op after the layer cannot modify the leaf.
        return leaf.clone()

    handle = target_layer.register_forward_hook(hook)
    # inference_mode(False): a caller's inference mode would forbid the tail's autograd.
    with torch.inference_mode(False):
        try:
            with torch.no_grad(), autocast_context(images.device, amp_dtype):
                logits = model(images)
        finally:
            handle.remove()
        if "activations" not in captured:
            raise ValueError("the target layer did not run in the model's forward")
        leaf = captured["activations"]
        gradients = None
        if need_grads:
            chosen = logits.argmax(dim=-1).tolist() if targets is None else targets
            loss = sum(ClassifierOutputTarget(int(t))(row) for t, row in zip(chosen, logits))
            gradients = torch.autograd.grad(loss, leaf)[0]
    activations = leaf.detach()
    if reshape_transform is not None:
        activations = reshape_transform(activations)
        gradients = None if gradients is None else reshape_transform(gradients)
    activations = activations.float().cpu()
    gradients = None if gradients is None else gradients.float().cpu()
    return logits.detach().float(), activations, gradients


def _distinct_masks(masks: Tensor) -> tuple[list[int], np.ndarray]:
    """The channels of ``masks [C, H, W]`` whose mask differs from every earlier one, and for
    each channel the position (in that list) of the channel whose score it can reuse.

    Candidates are grouped by an integer hash of the float bits computed on the masks' device
    (exact arithmetic, so equal masks always hash alike); masks with equal hashes are then
    compared exactly, so a match is always bit-identical.
    """
    flat = masks.reshape(masks.shape[0], -1).float().contiguous()
    bits = flat.view(torch.int32)
    multipliers = torch.randint(1, 2**31 - 1, (flat.shape[1],), generator=torch.Generator().manual_seed(0))
    multipliers = multipliers.to(flat.device)
    fingerprints = (
        torch.cat([(bits[start : start + 64].long() * multipliers).sum(dim=1) for start in range(0, len(bits), 64)])
        .cpu()
        .tolist()
    )
    distinct: list[int] = []
    reuse = np.empty(masks.shape[0], dtype=np.int64)
    groups: dict[int, list[int]] = {}
    for channel, fingerprint in enumerate(fingerprints):
        group = groups.setdefault(fingerprint, [])
        match = next((index for index in group if torch.equal(flat[distinct[index]], flat[channel])), None)
        if match is None:
            match = len(distinct)
            group.append(match)
            distinct.append(channel)
        reuse[channel] = match
    return distinct, reuse


class CamFamily(Explainer):
    """The grad-cam family: every gradient CAM of a batch from one shared forward/backward pass.

    ScoreCAM and AblationCAM add perturbation forwards of their own (:func:`compute_cams`).
    """

    methods = tuple(CAM_METHODS)

    def explain(
        self, context: ExplainContext, images: Tensor, targets: Sequence[int], methods: Sequence[str]
    ) -> Explanations:
        settings = context.settings
        reshape_transform = context.layout.reshape_transform if context.layout is not None else None
        device = next(context.model.module.parameters()).device
        by_dtype: dict[torch.dtype | None, list[str]] = {}
        for method in methods:  # `auto` keeps some methods in fp32 (xai_audit.tasks.compute.precision)
            kept = method in FP32_ON_CPU or method in FP32_UNDER_AUTO
            dtype = amp_dtype(settings.precision, device, method) if kept else context.amp_dtype
            by_dtype.setdefault(dtype, []).append(method)
        maps: dict[str, np.ndarray] = {}
        for dtype, group in by_dtype.items():
            maps |= compute_cams(
                context.model.module,
                context.layer,
                images,
                targets,
                group,
                amp_dtype=dtype,
                reshape_transform=reshape_transform,
                scorecam_batch_size=configured_batch_size(settings.scorecam_batch_size),
                ablationcam_batch_size=settings.ablationcam_batch_size,
                scorecam_channels=settings.scorecam_channels,
                groupcam_groups=settings.groupcam_groups,
            )
        return Explanations({method: maps[method] for method in methods})
