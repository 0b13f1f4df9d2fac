"""A model built by the user's code: ``callable`` (``package.module:function``, or ``mymodel.py:build``
for a file beside the config) returning an ``nn.Module``.

The string is imported, never evaluated (:mod:`xai_audit.tasks.core.callables`). Preprocessing and
class names come from the entry; one zero image of the configured input size checks the module
answers with one logit per class.
"""

from __future__ import annotations

import torch
from torch import nn

from xai_audit.tasks.core.callables import load_callable
from xai_audit.tasks.core.config import ModelConfig, WorldConfig
from xai_audit.tasks.core.errors import ConfigError
from xai_audit.tasks.data.sources.base import ModelSource, SourceModel, configured_class_names, configured_preprocess


class PythonSource(ModelSource):
    """Whatever module the user's factory returns; only running it tells its layers."""

    name = "python"
    required = ("callable",)

    def load(self, model: ModelConfig, field: str, world: WorldConfig) -> SourceModel:
        target = model.callable or ""
        factory = load_callable(target, f"{field}.callable")
        try:
            module = factory()
        except Exception as exc:  # the user's factory failing is a problem with this model entry
            raise ConfigError(f"{field}.callable", f"calling {target!r} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(module, nn.Module):
            raise ConfigError(
                f"{field}.callable", f"{target!r} returned a {type(module).__name__}, not a torch.nn.Module"
            )
        class_names = configured_class_names(model, field, required=True)
        preprocess, size, mean, std = configured_preprocess(model.preprocess, field)
        module.eval()
        param = next(module.parameters(), None)
        try:
            with torch.no_grad():
                out = module(torch.zeros(1, 3, size, size, device=param.device if param is not None else "cpu"))
        except Exception as exc:  # the model cannot take the configured input size
            raise ConfigError(
                f"{field}.preprocess",
                f"{target!r} fails on a [1, 3, {size}, {size}] input ({type(exc).__name__}: {exc})",
            ) from exc
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != len(class_names):
            shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(
                f"{field}.class_names",
                f"{target!r} outputs {shape} for one {size}x{size} image, expected [1, {len(class_names)}] logits",
            )
        return SourceModel(module, preprocess, class_names, size, mean, std, {"source": self.name, "callable": target})

    def built(self, model: ModelConfig, field: str) -> nn.Module | None:
        return self.load(model, field, WorldConfig()).module

    def geometry(self, model: ModelConfig) -> tuple[int, int] | None:
        return model.preprocess.resize, model.preprocess.crop
