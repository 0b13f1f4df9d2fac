"""Loaded models: a config entry turned into an eval-mode module with what the stages need.

:func:`load_model` asks the entry's source (:mod:`xai_audit.tasks.data.sources`) for the module, its
preprocessing and class names, and gives every model an identity (a hash of where it came from,
its weights, input and class names) that keys the caches. The layer helpers here serve every
source's models alike.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from PIL import Image
from torch import nn

from xai_audit.tasks.core.config import ModelConfig, WorldConfig
from xai_audit.tasks.core.errors import ConfigError
from xai_audit.tasks.data.layer_layout import LayerLayout, layout_of
from xai_audit.tasks.data.sources.registry import model_source


@dataclass
class LoadedModel:
    """An eval-mode model with everything the stages need to feed it and name its outputs."""

    name: str
    module: nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    class_names: list[str]
    layer_names: list[str]
    identity: str
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @cached_property
    def pixel_model(self) -> PixelModel:
        """The model on [0, 1] pixels (what LIME perturbs), built once so its inference copy is too."""
        return PixelModel(self.module, self.mean, self.std)


class PixelModel(nn.Module):
    """A classifier on [0, 1] pixels: its input normalisation in front, in eval mode."""

    def __init__(self, module: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.module = module
        parameter = next(module.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        self.register_buffer("mean", torch.tensor(mean, device=device, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, device=device, dtype=torch.float32).view(1, -1, 1, 1))
        self.train(module.training)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module(self.normalise(pixels))


def load_model(model: ModelConfig, field: str = "model", world: WorldConfig | None = None) -> LoadedModel:
    """Load the model a config entry describes; ``field`` prefixes error field paths.

    ``world`` is the synthetic world the demo source trains its model on (the run's ``world``;
    default: the default world).
    Raises :class:`ConfigError` for unknown sources, architectures, weights, missing files or
    bad class names, and :class:`CheckpointError` for unsafe, truncated or mismatching weights.
    """
    source = model_source(model.source, field)
    for problem_field, message in source.missing_fields(model, field):
        raise ConfigError(problem_field, message)
    loaded = source.load(model, field, world or WorldConfig())
    module = loaded.module
    module.eval()
    identity = _content_hash(
        {
            "origin": loaded.origin,
            "class": type(module).__qualname__,
            "weights": weights_identity(module),
            "input_size": loaded.input_size,
            "mean": list(loaded.mean),
            "std": list(loaded.std),
            "class_names": loaded.class_names,
        }
    )
    return LoadedModel(
        name=model.name,
        module=module,
        preprocess=loaded.preprocess,
        class_names=loaded.class_names,
        layer_names=[n for n, _ in module.named_modules() if n],
        identity=identity,
        input_size=loaded.input_size,
        mean=tuple(float(m) for m in loaded.mean),
        std=tuple(float(s) for s in loaded.std),
    )


# --------------------------------------------------------------------------- layers


def resolve_layer(module: nn.Module, name: str, field: str = "layer") -> nn.Module:
    """The submodule called ``name`` in ``named_modules()`` (``layer4``, ``layer4.1.conv2``).

    An unknown name raises :class:`ConfigError` listing the closest valid names first, then
    the top-level ones.
    """
    try:
        return module.get_submodule(name)
    except AttributeError:
        valid = [n for n, _ in module.named_modules() if n]
        close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
        top = [n for n, _ in module.named_children()]
        hint = f"closest: {', '.join(close)}; " if close else ""
        raise ConfigError(
            field,
            f"unknown layer {name!r}; {hint}top-level layers: {', '.join(top)} "
            f"({len(valid)} layers in all, named as in named_modules(), e.g. {valid[-1] if valid else ''})",
        ) from None


_POOLING = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)


def default_cam_layer(module: nn.Module, input_size: int = 224, field: str = "layer") -> str:
    """The layer CAMs use when the config names none, from one zero image of ``input_size``.

    Transformers (ViT, DeiT, Swin): the first norm of the last transformer block, as grad-cam's
    documentation advises (``blocks[-1].norm1`` in timm, ``encoder.layers[-1].ln_1`` in torchvision's
    ViT, ``features[-1][-1].norm1`` in its Swin). A block is a module with two or more LayerNorms of its
    own whose outputs are token sequences or channels-last maps (:mod:`xai_audit.tasks.data.layer_layout`);
    its norms are taken in call order.

    CNNs (everything else): the top-level child that ran last among those returning a 4-D
    ``[N, C, H, W]`` output with H, W > 1, pooling layers and identities aside — ``layer4`` for
    ResNets, ``features`` for VGG/DenseNet/MobileNet/EfficientNet/ConvNeXt/SqueezeNet,
    ``trunk_output`` for RegNet, ``blocks.<last>`` for MaxViT, ``inception5b``/``Mixed_7c`` for
    GoogLeNet/Inception-v3, ``stages`` for timm's ConvNeXt, ``bn2`` for timm's EfficientNet.
    """
    # Top-level children, and the members of top-level ModuleLists (never called themselves: MaxViT's blocks).
    children = {
        f"{name}.{member}" if member else name
        for name, child in module.named_children()
        for member in ([m for m, _ in child.named_children()] if isinstance(child, nn.ModuleList) else [""])
    }
    calls: list[tuple[str, nn.Module, tuple[int, ...] | None, LayerLayout | None]] = []
    hooks = []
    for name, sub in module.named_modules():
        if not name or (name not in children and not isinstance(sub, nn.LayerNorm)):
            continue

        def record(sub: nn.Module, _inp: Any, out: Any, name: str = name) -> None:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
            try:
                layout = layout_of(out) if shape is not None else None
            except ValueError:
                layout = None
            calls.append((name, sub, shape, layout))

        hooks.append(sub.register_forward_hook(record))
    was_training = module.training
    try:
        module.eval()
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            module(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        module.train(was_training)
    block_norms: dict[str, list[str]] = {}
    for name, sub, _, layout in calls:
        if isinstance(sub, nn.LayerNorm) and layout is not None and layout.channels_last:
            block_norms.setdefault(name.rpartition(".")[0], []).append(name)
    blocks = [norms for parent, norms in block_norms.items() if parent and len(dict.fromkeys(norms)) >= 2]
    if blocks:
        return blocks[-1][0]
    top = [
        (name, shape)
        for name, sub, shape, _ in calls
        if name in children and not isinstance(sub, (*_POOLING, nn.Identity))
    ]
    spatial = [i for i, (_, shape) in enumerate(top) if shape is not None and len(shape) == 4 and min(shape[2:]) > 1]
    if not spatial or any(shape is not None and len(shape) == 3 for _, shape in top[spatial[-1] + 1 :]):
        raise ConfigError(
            field,
            f"{type(module).__name__} has neither transformer blocks nor a convolutional feature map to use as "
            "the default CAM layer; name one in the config (a layer from named_modules())",
        )
    return top[spatial[-1]][0]


def weights_identity(module: nn.Module) -> str:
    """A SHA-256 of the module's state dict (names, dtypes, shapes and bytes, sorted by name)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _content_hash(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
