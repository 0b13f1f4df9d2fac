"""Every shortcut stays exact on every architecture, or steps aside and says so (#22, item 3).

The shortcuts: the inference copy (BatchNorm folded, packed convolutions; LIME, ScoreCAM and
deletion/insertion forward through it), ScoreCAM's lazily built, deduplicated mask batches and
AblationCAM's one-copy batching. Across the zoo (``tests/fixtures/zoo_models.py``) plus a CNN whose
forward flattens with the input's batch size, each is compared with the plain procedure: the model
itself, and grad-cam's own ScoreCAM and AblationCAM called as its README and
``usage_examples/vit_example.py`` call them (``AblationLayerVit`` for token and channels-last layers).
Two planted models read what the copy changes, so the copy must be refused, with a log line.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from pytorch_grad_cam import AblationCAM, ScoreCAM
from pytorch_grad_cam.ablation_layer import AblationLayer, AblationLayerVit
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from tests.fixtures import zoo_models
from tests.fixtures.tiny_models import batch_bound_cnn
from tests.fixtures.zoo_models import ZOO
from xai_audit.tasks.compute.inference import RTOL, inference_model
from xai_audit.tasks.data.layer_layout import layer_layout
from xai_audit.tasks.data.models import default_cam_layer
from xai_audit.tasks.explain.cams import compute_cams

SIZES = {family: member.size for family, member in ZOO.items()} | {"batch-bound-cnn": 64}


def _build(family: str) -> nn.Module:
    if family == "batch-bound-cnn":
        return batch_bound_cnn().eval()
    return getattr(zoo_models, ZOO[family].factory)()


def _images(size: int, count: int = 2) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("family", list(SIZES))
def test_the_inference_copy_is_kept_where_it_gives_the_models_outputs(family, caplog):
    model, images = _build(family), _images(SIZES[family])
    with caplog.at_level(logging.WARNING, logger="xai_audit.tasks.compute.inference"):
        fast = inference_model(model, images)
    assert fast is not model, caplog.text
    with torch.no_grad():
        plain = model(images)
        copied = fast(images.contiguous(memory_format=torch.channels_last))
    assert (copied - plain).abs().max() <= RTOL * plain.abs().max()


@pytest.mark.parametrize("family", list(SIZES))
def test_scorecam_and_ablationcam_equal_grad_cams_own_on_every_architecture(family):
    model, images = _build(family), _images(SIZES[family], count=1)
    layer = model.get_submodule(default_cam_layer(model, SIZES[family]))
    layout = layer_layout(model, layer, SIZES[family])
    # ScoreCAM costs a forward per unit: checked where the reshape transform matters or the layer is narrow.
    methods = ["scorecam", "ablationcam"] if layout.channels_last or _units(model, layer) <= 64 else ["ablationcam"]
    targets = [2]
    ours = compute_cams(model, layer, images, targets, methods, reshape_transform=layout.reshape_transform)
    stock_targets = [ClassifierOutputTarget(t) for t in targets]
    if "scorecam" in methods:
        with ScoreCAM(model, [layer], reshape_transform=layout.reshape_transform) as cam:
            np.testing.assert_allclose(ours["scorecam"], cam(input_tensor=images, targets=stock_targets), atol=1e-4)
    ablation = AblationLayerVit() if layout.channels_last else AblationLayer()
    # The library's inner batch equals ours (128): grad-cam replaces an ablated channel by min - 1e7, so on
    # random models with ~1e-3 logits its own maps move by up to 0.66 between inner batches of 32 and 7
    # (summation order), which would hide what this test is about.
    with AblationCAM(
        model, [layer], reshape_transform=layout.reshape_transform, ablation_layer=ablation, batch_size=128
    ) as cam:
        np.testing.assert_allclose(ours["ablationcam"], cam(input_tensor=images, targets=stock_targets), atol=1e-4)


def _units(model: nn.Module, layer: nn.Module) -> int:
    for child in reversed(list(layer.modules())):
        if isinstance(child, (nn.Conv2d, nn.BatchNorm2d)):
            return child.weight.shape[0]
    return 0


class GatedByBatchNorm(nn.Module):
    """Network-slimming style channel gating by the BatchNorm's own scale: the copy, whose BatchNorm is
    folded away into an identity, has no ``bn.weight`` to read."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gated = self.bn(self.conv(x)) * self.bn.weight.abs()[None, :, None, None]
        return self.head(torch.relu(gated).mean(dim=(2, 3)))


class ReadsConvBias(nn.Module):
    """Adds the convolution's bias once more: folding changes that bias, so the copy runs but differs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv(x)) + self.conv.bias[None, :, None, None]
        return self.head(torch.relu(out).mean(dim=(2, 3)))


def _with_statistics(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.conv.bias.uniform_(-1, 1)
    return model.eval()


@pytest.mark.parametrize(
    ("model_class", "reason"), [(GatedByBatchNorm, "raises AttributeError"), (ReadsConvBias, "differ by up to")]
)
def test_a_copy_that_is_not_exact_is_refused_once_with_a_log_line_and_scorecam_stays_grad_cams(
    model_class, reason, caplog
):
    model, images = _with_statistics(model_class()), _images(16)
    with caplog.at_level(logging.WARNING, logger="xai_audit.tasks.compute.inference"):
        assert inference_model(model, images) is model
        assert inference_model(model, images) is model  # decided once: one line
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and reason in lines[0] and model_class.__name__ in lines[0]
    ours = compute_cams(model, model.bn, images, [1, 2], ["scorecam"])["scorecam"]
    with ScoreCAM(model, [model.bn]) as cam:
        expected = cam(input_tensor=images, targets=[ClassifierOutputTarget(1), ClassifierOutputTarget(2)])
    np.testing.assert_allclose(ours, expected, atol=1e-5)
