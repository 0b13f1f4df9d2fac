"""Config name -> model source: the one place that lists where models come from.

A new source is one module defining a :class:`~xai_audit.tasks.data.sources.base.ModelSource` plus one entry
in :data:`BUILTIN` (and its name in ``ModelConfig.source``, which the config schema validates).
"""

from __future__ import annotations

from xai_audit.tasks.core.errors import ConfigError
from xai_audit.tasks.data.sources.base import ModelSource
from xai_audit.tasks.data.sources.checkpoint import CheckpointSource
from xai_audit.tasks.data.sources.demo import DemoSource
from xai_audit.tasks.data.sources.places365 import Places365Source
from xai_audit.tasks.data.sources.python import PythonSource
from xai_audit.tasks.data.sources.timm import TimmSource
from xai_audit.tasks.data.sources.torchvision import TorchvisionSource

BUILTIN: tuple[ModelSource, ...] = (
    TorchvisionSource(),
    TimmSource(),
    Places365Source(),
    CheckpointSource(),
    PythonSource(),
    DemoSource(),
)

SOURCES: dict[str, ModelSource] = {source.name: source for source in BUILTIN}
"""Every source by its ``models[].source`` name."""


def model_source(name: str, field: str = "model") -> ModelSource:
    """The source called ``name``; ConfigError at ``<field>.source`` naming the valid ones otherwise."""
    try:
        return SOURCES[name]
    except KeyError:
        raise ConfigError(f"{field}.source", f"unknown source {name!r}; valid: {', '.join(SOURCES)}") from None
