"""torchvision's published weights: ``arch`` + ``weights`` (a member of the arch's weights enum, e.g.
``IMAGENET1K_V1``, or ``DEFAULT``).

The file is downloaded into the torch hub cache (``$TORCH_HOME/hub/checkpoints``) on first use,
hash-checked, and works offline afterwards. Preprocessing and class names come from the weights'
metadata.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from xai_audit.tasks.core.config import ModelConfig, WorldConfig
from xai_audit.tasks.core.errors import CheckpointError, ConfigError
from xai_audit.tasks.data.sources.base import (
    ModelSource,
    Problem,
    SourceModel,
    arch_problems,
    check_arch,
    meta_skeleton,
)
from xai_audit.tasks.data.weights import download, torch_load_safely, url_filename


def _weights(arch: str, name: str | None, field: str) -> WeightsEnum:
    enum = torchvision.models.get_model_weights(arch)
    valid = [w.name for w in enum] + ["DEFAULT"]
    if name not in valid:
        raise ConfigError(f"{field}.weights", f"unknown weights {name!r} for {arch}; valid: {', '.join(valid)}")
    return enum[name]


class TorchvisionSource(ModelSource):
    """A torchvision architecture with one of its published weights."""

    name = "torchvision"
    required = ("arch", "weights")

    def load(self, model: ModelConfig, field: str, world: WorldConfig) -> SourceModel:
        arch = check_arch(model.arch, field)
        weights = _weights(arch, model.weights, field)
        # torchvision loads hub files with weights_only=False; fetch and vet the file first so
        # that call only ever unpickles a file that passed the weights_only check.
        filename = url_filename(weights.url)
        match = torch.hub.HASH_REGEX.search(filename)
        cached = download(
            weights.url,
            Path(torch.hub.get_dir()) / "checkpoints" / filename,
            f"{field}.weights",
            hash_prefix=match.group(1) if match else None,
        )
        torch_load_safely(cached, mmap=zipfile.is_zipfile(cached))  # legacy files cannot be mapped
        try:
            module = torchvision.models.get_model(arch, weights=weights)
        except Exception as exc:  # noqa: BLE001 - a vetted file that still does not fit the architecture
            raise CheckpointError(f"{cached}: cannot load into {arch} ({type(exc).__name__}: {exc})") from None
        preprocess = weights.transforms()
        origin = {"source": self.name, "arch": arch, "weights": weights.name, "url": weights.url}
        return SourceModel(
            module,
            preprocess,
            list(weights.meta["categories"]),
            int(preprocess.crop_size[0]),
            preprocess.mean,
            preprocess.std,
            origin,
        )

    def problems(self, model: ModelConfig, field: str) -> Iterator[Problem]:
        arch_refused = list(arch_problems(model.arch, field))
        yield from arch_refused
        if arch_refused:
            return
        try:
            _weights(model.arch, model.weights, field)
        except ConfigError as error:
            yield error.field, error.message

    def skeleton(self, model: ModelConfig) -> nn.Module | None:
        return meta_skeleton(model.arch)

    def class_names(self, model: ModelConfig) -> list[str] | None:
        try:
            return list(_weights(model.arch, model.weights, "model").meta["categories"])
        except (KeyError, ValueError, ConfigError):
            return None

    def geometry(self, model: ModelConfig) -> tuple[int, int] | None:
        try:
            transforms = _weights(model.arch, model.weights, "model").transforms()
            return int(transforms.resize_size[0]), int(transforms.crop_size[0])
        except (KeyError, ValueError, AttributeError, ConfigError):
            return None
