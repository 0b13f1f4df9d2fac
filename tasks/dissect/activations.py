"""Layer activations of a model over a probe set: forward hooks, per-unit pooling, on-disk cache.

Every requested layer is captured in one forward pass per batch. Pooled activations (one value
per unit per image, what CLIP-Dissect compares) can be cached on disk; spatial activations (what
Network Dissection thresholds) are streamed batch by batch and never held for the whole set.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from xai_audit.tasks.core.cache import cache_dir
from xai_audit.tasks.core.errors import ConfigError
from xai_audit.tasks.core.progress import track
from xai_audit.tasks.data.layer_layout import layout_of

log = logging.getLogger(__name__)

POOLINGS: tuple[str, ...] = ("avg", "max")


class _AllLayersCaptured(Exception):
    """Raised from a hook to skip the rest of the forward once every requested layer has fired."""


def resolve_layers(module: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    """The submodule of each layer name (``named_modules`` spelling, e.g. ``layer4.1.conv2``)."""
    if not layers:
        raise ConfigError("layers", "no layer requested; name at least one (e.g. 'layer4')")
    resolved: dict[str, nn.Module] = {}
    for name in layers:
        try:
            resolved[name] = module.get_submodule(name)
        except AttributeError:
            known = [n for n, _ in module.named_modules() if n]
            hint = ", ".join(known[:25]) + (", ..." if len(known) > 25 else "")
            raise ConfigError("layers", f"model has no layer {name!r}; valid names include: {hint}") from None
    return resolved


def _first_tensor(output: object, layer: str) -> Tensor:
    # Attention blocks and some wrappers return tuples; their first element is the activation.
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ConfigError("layers", f"layer {layer!r} outputs {type(output).__name__}, not a tensor")


class LayerRecorder:
    """Context manager that records the outputs of named layers during forward passes.

    ``transform`` (optional) is applied inside the hook, so a pooled result can replace a large
    spatial map as soon as the layer has run. With ``stop_early`` the forward is cut short once
    every layer has fired (use :meth:`forward`), which saves the layers after the deepest one.
    ``outputs[name]`` holds the (transformed) output of the layer's latest call; :meth:`forward`
    clears it first. Hooks are removed on exit, also when the body raises.
    """

    def __init__(
        self,
        module: nn.Module,
        layers: Sequence[str],
        transform: Callable[[Tensor], Tensor] | None = None,
        *,
        stop_early: bool = False,
    ) -> None:
        self.module = module
        self.layers = list(dict.fromkeys(layers))
        self.transform = transform
        self.stop_early = stop_early
        self.outputs: dict[str, Tensor] = {}
        self._in_forward = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            tensor = _first_tensor(output, name)
            self.outputs[name] = self.transform(tensor) if self.transform else tensor
            if self._in_forward and self.stop_early and len(self.outputs) == len(self.layers):
                raise _AllLayersCaptured

        return hook

    def __enter__(self) -> LayerRecorder:
        for name, sub in resolve_layers(self.module, self.layers).items():
            self._handles.append(sub.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def forward(self, inputs: Tensor) -> dict[str, Tensor]:
        """Run the module on ``inputs`` and return the recorded output of every layer."""
        self.outputs = {}
        self._in_forward = True
        try:
            self.module(inputs)
        except _AllLayersCaptured:
            pass
        finally:
            self._in_forward = False
        missing = [name for name in self.layers if name not in self.outputs]
        if missing:
            raise ConfigError("layers", f"layers {missing} did not run during the forward pass")
        return self.outputs


def pool_units(output: Tensor, pooling: str) -> Tensor:
    """One value per unit and image: ``[b, units]``.

    Unit maps (conv ``[b, c, h, w]``, Swin-style channels-last ``[b, h, w, c]``, ViT token sequences
    without prefix tokens: :mod:`xai_audit.tasks.data.layer_layout`) are averaged (``avg``) or maxed (``max``)
    over space. A token sequence with prefix tokens gives its CLS token (index 0): the summary the
    model's head reads, while the patch tokens are what Network Dissection thresholds
    (:func:`spatial_units`). 2-D outputs are returned as they are.
    """
    if pooling not in POOLINGS:
        raise ConfigError("pooling", f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
    if output.dim() == 2:
        return output
    if output.dim() in (3, 4):
        layout = layout_of(output)
        if layout.kind == "tokens" and layout.prefix_tokens:
            return output[:, 0]
        maps = layout(output)
        return maps.mean(dim=(2, 3)) if pooling == "avg" else maps.amax(dim=(2, 3))
    raise ConfigError("layers", f"cannot pool a {output.dim()}-D layer output of shape {tuple(output.shape)}")


def spatial_units(output: Tensor) -> Tensor:
    """A layer output as unit maps ``[b, units, h, w]`` (what Network Dissection thresholds).

    Conv maps pass through, channels-last maps have their channels moved first, and token sequences
    drop their prefix tokens (CLS, distillation, registers) and fold the patch tokens into their
    square grid (:mod:`xai_audit.tasks.data.layer_layout`).
    """
    try:
        return layout_of(output)(output)
    except ValueError as error:
        raise ConfigError("layers", f"{error}; it cannot be dissected") from None


def _batch_tensor(batch: object) -> Tensor:
    # DataLoaders usually yield (images, labels, ...); the images come first.
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(f"a batch must be a Tensor or a tuple starting with one, not {type(batch).__name__}")


def _progress(batches: Iterable, progress: bool, desc: str) -> Iterable:
    return track(batches, desc) if progress else batches


def pooled_activations(
    module: nn.Module,
    layers: Sequence[str],
    batches: Iterable[Tensor],
    pooling: str = "avg",
    device: str | torch.device = "cpu",
    *,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Pooled activations ``{layer: Tensor[n_images, units]}`` (float32, CPU) of all layers, one pass.

    ``batches`` yields image tensors ``[b, 3, H, W]`` (or tuples whose first item is one), already
    preprocessed for the model. The module is used as it is (call ``.eval()`` first).
    """
    if pooling not in POOLINGS:
        raise ConfigError("pooling", f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
    device = torch.device(device)
    parts: dict[str, list[Tensor]] = {name: [] for name in dict.fromkeys(layers)}
    # Copy inside the hook: later in-place ops of the model (``out += identity``) must not leak in.
    recorder = LayerRecorder(
        module, list(parts), lambda out: pool_units(out, pooling).to(torch.float32, copy=True), stop_early=True
    )
    with recorder, torch.inference_mode():
        for batch in _progress(batches, progress, "activations"):
            images = _batch_tensor(batch).to(device, non_blocking=True)
            for name, pooled in recorder.forward(images).items():
                parts[name].append(pooled.cpu())
    if not any(parts.values()):
        raise ConfigError("probe", "the probe set yielded no batches")
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def finite_selection(activations: Tensor) -> tuple[Tensor, Tensor]:
    """(usable images ``[n_images]``, usable units ``[n_units]``) of activations ``[n_images, n_units, ...]``.

    A NaN or infinite value must never reach a score (CLIP-Dissect would rank it, an IoU tally
    would threshold it). A unit with no finite value on any image is broken itself; any other
    non-finite value condemns its image, which is then left out for every unit.
    """
    finite = torch.isfinite(activations).flatten(2).all(dim=2) if activations.dim() > 2 else torch.isfinite(activations)
    units = finite.any(dim=0)
    return finite[:, units].all(dim=1), units


def iter_spatial_activations(
    module: nn.Module,
    layers: Sequence[str],
    batches: Iterable[Tensor],
    device: str | torch.device = "cpu",
    *,
    output_device: str | torch.device = "cpu",
    progress: bool = False,
) -> Iterator[dict[str, Tensor]]:
    """Per batch, ``{layer: Tensor[b, units, h, w]}`` (float32) at each layer's native resolution.

    One forward per batch for all layers; nothing is kept between batches, so a consumer that
    tallies as it goes (Network Dissection) uses memory independent of the probe-set size.
    """
    device = torch.device(device)
    recorder = LayerRecorder(
        module,
        list(dict.fromkeys(layers)),
        lambda out: spatial_units(out).to(output_device, torch.float32, copy=True),
        stop_early=True,
    )
    with recorder:
        for batch in _progress(batches, progress, "activations"):
            images = _batch_tensor(batch).to(device, non_blocking=True)
            with torch.inference_mode():
                maps = dict(recorder.forward(images))
            yield maps


def _layer_file(directory: Path, layer: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", layer)[:80]
    digest = hashlib.sha256(layer.encode()).hexdigest()[:8]
    return directory / f"{safe}-{digest}.safetensors"


def write_tensor_atomic(tensor: Tensor, path: Path) -> None:
    """Save one tensor as safetensors at ``path``: written to a temp file, then renamed."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({"tensor": tensor.contiguous()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_cached_tensor(path: Path) -> Tensor | None:
    """The tensor saved by :func:`write_tensor_atomic`, or None when absent or unreadable."""
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        return load_file(str(path))["tensor"]
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: recompute rather than fail the run
        log.warning("ignoring unreadable cache file %s (%s); recomputing", path, exc)
        return None


def activation_cache_dir(model_identity: str, probe_identity: str, pooling: str) -> Path:
    """The cache folder of pooled activations for one (model weights, probe set, pooling)."""
    return cache_dir("activations", model=model_identity, probe=probe_identity, pooling=pooling)


def cached_pooled_activations(
    module: nn.Module,
    layers: Sequence[str],
    batches_factory: Callable[[], Iterable[Tensor]],
    *,
    model_identity: str,
    probe_identity: str,
    pooling: str = "avg",
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Tensor]:
    """:func:`pooled_activations` with one cache file per (model, probe set, layer, pooling).

    ``model_identity`` must change whenever the weights do (include their hash) and
    ``probe_identity`` whenever the images or their order/preprocessing do. Only missing layers
    are computed, in one pass over a fresh ``batches_factory()``; files are written atomically.
    """
    if pooling not in POOLINGS:
        raise ConfigError("pooling", f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
    layers = list(dict.fromkeys(layers))
    directory = activation_cache_dir(model_identity, probe_identity, pooling)
    result: dict[str, Tensor] = {}
    for layer in layers:
        cached = read_cached_tensor(_layer_file(directory, layer))
        if cached is not None:
            result[layer] = cached
    missing = [layer for layer in layers if layer not in result]
    if missing:
        computed = pooled_activations(module, missing, batches_factory(), pooling, device, progress=progress)
        for layer, tensor in computed.items():
            write_tensor_atomic(tensor, _layer_file(directory, layer))
            result[layer] = tensor
    return {layer: result[layer] for layer in layers}
