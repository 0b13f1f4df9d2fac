"""Convolutions whose weights are reordered for oneDNN once, not on every CPU forward.

An eager ``Conv2d`` hands oneDNN a plain (NCHW or channels-last) weight, which oneDNN reorders
into its blocked layout inside every call. For the many small-batch forwards of LIME, ScoreCAM
and deletion/insertion that reorder is a visible share of the work: ResNet18 on 2 CPU cores
runs 7-15 % faster at 128 px and 1-4 % at 224 px with the weights reordered once (benchmarks/
RESULTS.md). ``torch.ops.mkldnn._convolution_pointwise`` with a weight from
``torch.ops.mkldnn._reorder_convolution_weight`` is the pair torch's own inductor emits for CPU
convolutions; here it runs eagerly, with no compilation.

Float32 forwards and bfloat16 autocast forwards without autograd take the packed path (bf16
gains less, ~4 %); everything else (gradients, other dtypes, other devices) runs ``Conv2d``'s own
forward on the same parameters.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PackedConv2d(nn.Conv2d):
    """A ``Conv2d`` that also keeps its weight in oneDNN's layout for CPU inference.

    Built from an existing convolution (:meth:`from_conv`), sharing its parameters and hooks.
    A weight is packed per compute dtype on first use (float32, or bfloat16 under CPU
    autocast, which casts a convolution's input, weight and bias to it). Packed weights are
    snapshots: the module is meant for gradient-free inference copies whose parameters never
    change (copies and unpickled modules pack again).
    """

    _packed: dict[torch.dtype, tuple[Tensor, Tensor | None]]

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> PackedConv2d:
        packed = cls.__new__(cls)
        packed.__dict__.update(conv.__dict__)
        packed._packed = {}
        return packed

    def forward(self, input: Tensor) -> Tensor:
        dtype = self._compute_dtype(input)
        if dtype is None:
            return super().forward(input)
        weight, bias = self._packed.get(dtype) or self._pack(dtype)
        return torch.ops.mkldnn._convolution_pointwise(
            input.to(dtype),
            weight,
            bias,
            list(self.padding),
            list(self.stride),
            list(self.dilation),
            self.groups,
            "none",
            [],
            "",
        )

    def _compute_dtype(self, input: Tensor) -> torch.dtype | None:
        """The dtype the packed op runs in for ``input``, or None where ``Conv2d.forward`` must run."""
        if input.device.type != "cpu" or (
            torch.is_grad_enabled() and (input.requires_grad or self.weight.requires_grad)
        ):
            return None
        dtype = input.dtype
        if torch.is_autocast_enabled("cpu"):
            autocast_dtype = torch.get_autocast_dtype("cpu")
            dtype = autocast_dtype if dtype in (torch.float32, autocast_dtype) else None
        return dtype if dtype in PACKED_DTYPES and _packing_works(dtype) else None

    def _pack(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        weight = torch.ops.mkldnn._reorder_convolution_weight(
            self.weight.detach().to(dtype), list(self.padding), list(self.stride), list(self.dilation), self.groups
        )
        packed = self._packed[dtype] = (weight, None if self.bias is None else self.bias.detach().to(dtype))
        return packed

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # opaque oneDNN tensors can be neither copied nor pickled
        state["_packed"] = {}
        return state


PACKED_DTYPES = (torch.float32, torch.bfloat16)
"""Compute dtypes the packed path serves; any other runs ``Conv2d``'s forward."""


def packable(conv: nn.Module) -> bool:
    """A plain float32 CPU ``Conv2d`` with zero padding given in numbers, on a build with oneDNN."""
    return (
        type(conv) is nn.Conv2d
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and conv.weight.dtype is torch.float32
        and conv.weight.device.type == "cpu"
        and _packing_works()
    )


def pack_convolutions(model: nn.Module) -> nn.Module:
    """Swap every packable ``Conv2d`` of ``model`` (in place) for a :class:`PackedConv2d`; returns ``model``."""
    for name, module in list(model.named_modules()):
        if name and packable(module):
            model.set_submodule(name, PackedConv2d.from_conv(module))
    return model


@functools.cache
def _packing_works(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this build and CPU run packed convolutions in ``dtype`` and agree with ``F.conv2d`` (checked once)."""
    if not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled:
        return False
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=2).requires_grad_(False)
    conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
    images = torch.randn(2, 4, 9, 9, generator=generator)
    expected = F.conv2d(images.to(dtype), conv.weight.to(dtype), conv.bias.to(dtype), 2, 1, 1, 2)
    try:
        with torch.no_grad():
            weight, bias = PackedConv2d.from_conv(conv)._pack(dtype)
            packed = torch.ops.mkldnn._convolution_pointwise(
                images.to(dtype), weight, bias, [1, 1], [2, 2], [1, 1], 2, "none", [], ""
            )
    except (RuntimeError, AttributeError, NotImplementedError):  # op missing or dtype unsupported on this CPU
        return False
    tolerance = 1e-5 if dtype is torch.float32 else 2e-2
    return bool(torch.allclose(packed.float(), expected.float(), rtol=tolerance, atol=tolerance))
