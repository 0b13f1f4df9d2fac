"""The synthetic world's trained ResNet18 (:mod:`xai_audit.tasks.world.demo_model`).

The model directory in ``path`` when given, else the model of the run's world (trained on first
use). Preprocessing is the world's: resize and crop to its image size, its mean and std.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from xai_audit.tasks.core.config import ModelConfig, WorldConfig
from xai_audit.tasks.data.sources.base import ModelSource, SourceModel, meta_skeleton, standard_preprocess
from xai_audit.tasks.world import demo_model
from xai_audit.tasks.world.synthetic import SHAPES

ARCH = "resnet18"  # what xai_audit.tasks.world.demo_model trains


class DemoSource(ModelSource):
    """The demo model of a synthetic world: a ResNet18 classifying its shapes."""

    name = "demo"
    trained_on_world = True

    def load(self, model: ModelConfig, field: str, world: WorldConfig) -> SourceModel:
        folder = Path(model.path) if model.path else demo_model.ensure_demo_model(world)
        module, meta = demo_model.load_demo_model(folder)
        size = int(meta["image_size"])
        mean, std = tuple(meta["mean"]), tuple(meta["std"])
        origin = {"source": self.name, "arch": meta.get("arch", ARCH)}
        return SourceModel(
            module, standard_preprocess(size, size, mean, std), list(meta["class_names"]), size, mean, std, origin
        )

    def skeleton(self, model: ModelConfig) -> nn.Module | None:
        return meta_skeleton(ARCH, len(SHAPES))

    def class_names(self, model: ModelConfig) -> list[str] | None:
        return list(SHAPES)
