"""How a layer's output becomes unit maps ``[B, C, h, w]``, for CNNs and vision transformers alike.

CAMs, Network Dissection and CLIP-Dissect read unit maps. Convolutional layers give them as they are
(NCHW); Swin's and ConvNeXt's channels-last blocks give ``[B, h, w, C]``; ViT/DeiT blocks give token
sequences ``[B, prefix + h·w, C]`` whose first tokens (CLS, DeiT's distillation token, registers) belong
to no image position. grad-cam's documentation asks for a ``reshape_transform`` for such layers
(``usage_examples/vit_example.py``: drop the CLS token, fold the rest into the square grid, move channels
first; ``swinT_example.py``: channels first). :func:`layout_of` infers which case a layer is from its
output's shape, and the :class:`LayerLayout` it returns is that transform.

The inference assumes square inputs (every preprocessing here centre-crops a square): a 4-D output whose
last two sides are equal and differ from the second is NCHW, one whose middle sides are equal and differ
from the last is NHWC (equal everywhere: NCHW). A token sequence of ``T`` tokens has ``T - g²`` prefix
tokens, ``g = isqrt(T)`` (unless the model states its ``num_prefix_tokens``, as timm's ViTs do), which is
right whenever there are fewer prefix tokens than ``2g + 1`` (one CLS, a distillation token and four
registers need a grid of at least 3×3).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LayerLayout:
    """A layer output's layout; calling it turns such an output into ``[B, C, h, w]`` unit maps."""

    kind: Literal["nchw", "nhwc", "tokens"]
    prefix_tokens: int = 0
    """Tokens before the patch grid (CLS, distillation, registers), dropped from the maps."""

    def __call__(self, output: Tensor) -> Tensor:
        if self.kind == "nchw":
            return output
        if self.kind == "nhwc":
            return output.permute(0, 3, 1, 2)
        patches = output[:, self.prefix_tokens :]
        side = math.isqrt(patches.shape[1])
        return patches.reshape(output.shape[0], side, side, output.shape[2]).permute(0, 3, 1, 2)

    @property
    def reshape_transform(self) -> LayerLayout | None:
        """grad-cam's ``reshape_transform`` for this layer (None: the output is NCHW already)."""
        return None if self.kind == "nchw" else self

    @property
    def channels_last(self) -> bool:
        """Whether units are the last axis (grad-cam then ablates with ``AblationLayerVit``)."""
        return self.kind != "nchw"

    def describe(self) -> str:
        """What the run records: how the layer's output became maps."""
        if self.kind == "tokens":
            return f"tokens: {self.prefix_tokens} prefix token(s) dropped, patch tokens as a square grid"
        return "nhwc: channels moved first" if self.kind == "nhwc" else "nchw"


def layout_of(output: Tensor, prefix_tokens: int | None = None) -> LayerLayout:
    """The layout of one layer output (module docstring); ValueError when it has no square grid."""
    shape = tuple(output.shape)
    if output.dim() == 4:
        if shape[1] == shape[2] and shape[3] != shape[2]:
            return LayerLayout("nhwc")
        return LayerLayout("nchw")
    if output.dim() == 3 and shape[1] > 0:
        if prefix_tokens is None:
            prefix_tokens = shape[1] - math.isqrt(shape[1]) ** 2
        patches = shape[1] - prefix_tokens
        if patches > 0 and math.isqrt(patches) ** 2 == patches:
            return LayerLayout("tokens", prefix_tokens)
    raise ValueError(f"a layer output of shape {list(shape)} has no square grid of units to map")


def model_prefix_tokens(module: nn.Module) -> int | None:
    """The prefix tokens a model declares (timm's ``num_prefix_tokens``), or None."""
    value = getattr(module, "num_prefix_tokens", None)
    return int(value) if isinstance(value, int) else None


_layouts: weakref.WeakKeyDictionary[nn.Module, dict[int, tuple[LayerLayout, tuple[int, ...]]]] = (
    weakref.WeakKeyDictionary()
)


def layer_layout(module: nn.Module, layer: nn.Module, input_size: int) -> LayerLayout:
    """The layout of ``layer``'s output in ``module``, from one zero image of ``input_size`` (once per model)."""
    known = _layouts.setdefault(module, {})
    if id(layer) not in known:
        output = _layer_output(module, layer, input_size)
        known[id(layer)] = (layout_of(output, model_prefix_tokens(module)), tuple(output.shape))
    return known[id(layer)][0]


def _layer_output(module: nn.Module, layer: nn.Module, input_size: int) -> Tensor:
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        captured.append(output if isinstance(output, Tensor) else output[0])

    handle = layer.register_forward_hook(hook)
    was_training = module.training
    param = next(module.parameters(), None)
    try:
        module.eval()
        with torch.no_grad():
            module(torch.zeros(1, 3, input_size, input_size, device=param.device if param is not None else "cpu"))
    finally:
        handle.remove()
        module.train(was_training)
    if not captured:
        raise ValueError("the layer did not run in the model's forward")
    return captured[-1]
