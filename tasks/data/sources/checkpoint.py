"""A local state dict for a torchvision architecture: ``arch`` (with ``num_classes`` or
``class_names``) + ``path`` (``.safetensors``, or a torch pickle loaded with ``weights_only=True``).

Preprocessing and class names come from the entry (1000 ``class_i`` names when it gives neither).
"""

from __future__ import annotations

from collections.abc import Iterator

import torchvision
from torch import nn

from xai_audit.tasks.core.config import ModelConfig, WorldConfig
from xai_audit.tasks.core.errors import ConfigError
from xai_audit.tasks.data.sources.base import (
    ModelSource,
    Problem,
    SourceModel,
    arch_problems,
    check_arch,
    configured_class_names,
    configured_preprocess,
    meta_skeleton,
)
from xai_audit.tasks.data.weights import load_state_into, local_file, read_state_dict

DEFAULT_CLASSES = 1000  # torchvision's own default head


class CheckpointSource(ModelSource):
    """A torchvision architecture with weights from a local file."""

    name = "checkpoint"
    required = ("arch", "path")

    def load(self, model: ModelConfig, field: str, world: WorldConfig) -> SourceModel:
        arch = check_arch(model.arch, field)
        if not model.path:
            raise ConfigError(f"{field}.path", "source 'checkpoint' needs a path to a state dict")
        path = local_file(model.path, f"{field}.path", "checkpoint")
        class_names = configured_class_names(model, field, required=False)
        num_classes = model.num_classes or (len(class_names) if class_names else DEFAULT_CLASSES)
        class_names = class_names or [f"class_{i}" for i in range(num_classes)]
        state = read_state_dict(path)
        module = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        load_state_into(module, state, str(path))
        preprocess, size, mean, std = configured_preprocess(model.preprocess, field)
        return SourceModel(module, preprocess, class_names, size, mean, std, {"source": self.name, "arch": arch})

    def problems(self, model: ModelConfig, field: str) -> Iterator[Problem]:
        return arch_problems(model.arch, field)

    def skeleton(self, model: ModelConfig) -> nn.Module | None:
        listed = len(model.class_names) if isinstance(model.class_names, list) else None
        return meta_skeleton(model.arch, model.num_classes or listed)

    def geometry(self, model: ModelConfig) -> tuple[int, int] | None:
        return model.preprocess.resize, model.preprocess.crop
