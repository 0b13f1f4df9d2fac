"""Per-process runtime state for tasks: the torch device and a cache of loaded models."""
from __future__ import annotations

import threading

import torch

from flows.config import AuditConfig, ModelConfig
from tasks.errors import ConfigError

_models: dict[tuple[str, str], object] = {}
_lock = threading.Lock()


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; an unavailable CUDA request is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{name!r} requested but CUDA is not available; use auto or cpu")
    return device


def loaded_model(config: AuditConfig, model_config: ModelConfig):
    """The model of ``model_config`` on the run's device, loaded once per process and reused."""
    from tasks.models import load_model

    key = (model_config.model_dump_json(), config.device)
    with _lock:
        if key not in _models:
            model = load_model(model_spec(config, model_config))
            model.module.to(resolve_device(config.device))
            _models[key] = model
        return _models[key]


def model_spec(config: AuditConfig, model_config: ModelConfig):
    """The registry's spec for a configured model (the demo source is bound to the config's world)."""
    from tasks.models import ModelSpec

    fields = model_config.model_dump(exclude={"cam_layer"})
    spec = ModelSpec(**{**fields, "preprocess": model_config.preprocess})
    if model_config.source == "demo" and spec.path is None:
        from tasks.demo_model import ensure_demo_model

        spec = ModelSpec(**{**fields, "preprocess": model_config.preprocess, "path": str(ensure_demo_model(world_spec(config)))})
    return spec


def world_spec(config: AuditConfig):
    """The generator spec of the config's synthetic world."""
    from tasks.synthetic import WorldSpec

    return WorldSpec(**config.world.model_dump())
