"""Planted models that emit NaN or Inf for inputs we choose, loaded through the `python` model source."""

from __future__ import annotations

import torch

from tests.fixtures.tiny_models import tiny_resnet

#: Normalised inputs averaging above this are "bright" (a white image averages ~2.4, noise ~0).
BRIGHT = 1.5
#: Normalised inputs whose standard deviation is below this are "flat" (blurred or uniform).
FLAT = 0.8


def _poisoned(module: torch.nn.Module, rule, value: float) -> torch.nn.Module:
    def poison(_module, inputs, output):
        chosen = rule(inputs[0]).to(output.device)[:, None]
        return torch.where(chosen, torch.full_like(output, value), output)

    module.register_forward_hook(poison)
    return module


def nan_on_bright(num_classes: int = 3) -> torch.nn.Module:
    """:func:`tiny_resnet` whose logits are NaN for bright images (and only for them)."""
    return _poisoned(tiny_resnet(num_classes), lambda x: x.mean(dim=(1, 2, 3)) > BRIGHT, float("nan"))


def inf_on_flat(num_classes: int = 3) -> torch.nn.Module:
    """:func:`tiny_resnet` whose logits are +Inf for flat inputs: fine on noise images, broken on
    their blurred versions (what deletion and insertion feed it)."""
    return _poisoned(tiny_resnet(num_classes), lambda x: x.flatten(1).std(dim=1) < FLAT, float("inf"))


class NanUnitNet(torch.nn.Module):
    """A conv layer (``features``) whose activations are NaN for bright images and, with
    ``broken_unit``, NaN for every image in unit 1; then pooling and a linear head."""

    def __init__(self, broken_unit: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.broken_unit = broken_unit
        self.features = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(4, 3)
        self.features.register_forward_hook(self._poison)

    def _poison(self, _module, inputs, output):
        output = output.clone()
        output[inputs[0].mean(dim=(1, 2, 3)) > BRIGHT] = float("nan")
        if self.broken_unit:
            output[:, 1] = float("nan")
        return output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))
