"""Packed convolutions: the same outputs as torch's convolution, on every path a forward can take."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from xai_audit.tasks.compute.inference import inference_model
from xai_audit.tasks.compute.packed_conv import PACKED_DTYPES, PackedConv2d, pack_convolutions, packable

CONFIGS = [
    dict(in_channels=3, out_channels=8, kernel_size=7, stride=2, padding=3, bias=False),
    dict(in_channels=6, out_channels=12, kernel_size=3, stride=1, padding=2, dilation=2, groups=3),
    dict(in_channels=5, out_channels=4, kernel_size=(1, 3), stride=(2, 1), padding=(0, 1)),
    dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8),  # depthwise
]


def _conv(config: dict, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(**config).eval().requires_grad_(False)


def _reference(conv: nn.Conv2d, images: torch.Tensor) -> torch.Tensor:
    return F.conv2d(images, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_forward_matches_torch_convolution(config, channels_last):
    conv = _conv(config)
    packed = PackedConv2d.from_conv(copy.deepcopy(conv))
    images = torch.randn(3, config["in_channels"], 13, 11)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(packed(images), _reference(conv, images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed(images[:1]), _reference(conv, images[:1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forwards_match_torchs_autocast_convolution(dtype):
    conv = _conv(CONFIGS[1])
    packed = PackedConv2d.from_conv(copy.deepcopy(conv))
    images = torch.randn(2, 6, 10, 10)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        expected = _reference(conv, images)
        output = packed(images)
    assert output.dtype == expected.dtype == dtype
    torch.testing.assert_close(output.float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert (dtype in packed._packed) == (dtype in PACKED_DTYPES)  # bf16 packed; fp16 ran Conv2d's forward


def test_gradients_flow_through_the_convolutions_own_path():
    conv = _conv(CONFIGS[1])
    packed = PackedConv2d.from_conv(copy.deepcopy(conv))
    images = torch.randn(2, 6, 10, 10)
    inputs = images.clone().requires_grad_(True)
    packed(inputs).square().sum().backward()
    expected_inputs = images.clone().requires_grad_(True)
    _reference(conv, expected_inputs).square().sum().backward()
    torch.testing.assert_close(inputs.grad, expected_inputs.grad, rtol=1e-5, atol=1e-5)
    assert not packed._packed


def test_copies_and_pickles_pack_again_and_hooks_survive_packing():
    conv = _conv(CONFIGS[0])
    images = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = _reference(conv, images)
        unpickled = pickle.loads(pickle.dumps(PackedConv2d.from_conv(copy.deepcopy(conv))))
        torch.testing.assert_close(unpickled(images), expected, rtol=1e-5, atol=1e-5)

        calls = []
        conv.register_forward_hook(lambda module, inputs, output: calls.append(output.shape))
        packed = PackedConv2d.from_conv(conv)
        for clone in (packed, copy.deepcopy(packed)):
            torch.testing.assert_close(clone(images), expected, rtol=1e-5, atol=1e-5)
    assert calls == [torch.Size([1, 8, 8, 8])] * 2


class Mixed(nn.Module):
    """Convolutions the packed op covers and three it must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        self.plain = nn.Conv2d(3, 4, 3, padding=1)
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.same = nn.Conv2d(4, 4, 3, padding="same")
        self.float64 = nn.Conv2d(4, 2, 1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.float64(self.same(self.reflect(self.plain(x))).double())


def test_only_plain_zero_padded_float32_convolutions_are_packed():
    torch.manual_seed(3)
    model = Mixed().eval().requires_grad_(False)
    images = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        expected = model(images)
        packed = pack_convolutions(copy.deepcopy(model))
        assert isinstance(packed.plain, PackedConv2d)
        assert [type(packed.get_submodule(name)) for name in ("reflect", "same", "float64")] == [nn.Conv2d] * 3
        assert not packable(packed.plain)  # already packed: a subclass is never packed again
        torch.testing.assert_close(packed(images), expected, rtol=1e-6, atol=1e-6)


def test_cpu_inference_copy_packs_every_resnet_convolution_and_keeps_the_logits():
    torch.manual_seed(4)
    model = torchvision.models.resnet18(num_classes=7).eval()
    fast = inference_model(model)
    convolutions = [m for m in fast.modules() if isinstance(m, nn.Conv2d)]
    assert convolutions and all(isinstance(m, PackedConv2d) for m in convolutions)
    images = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        torch.testing.assert_close(
            fast(images.contiguous(memory_format=torch.channels_last)),
            expected,
            rtol=1e-5,
            atol=1e-5 * float(expected.abs().max()),
        )
