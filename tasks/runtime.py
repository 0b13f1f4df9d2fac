"""Per-process runtime state for tasks: the torch device and a cache of loaded models."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from flows.config import AuditConfig, ModelConfig
from tasks.errors import ConfigError

_models: dict[tuple[str, str], object] = {}
_model_locks: dict[tuple[str, str], threading.Lock] = {}
_lock = threading.Lock()


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; an unavailable CUDA request is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{name!r} requested but CUDA is not available; use auto or cpu")
    return device


@contextmanager
def using_model(config: AuditConfig, model_config: ModelConfig) -> Iterator:
    """The model of ``model_config`` on the run's device, loaded once per process, held exclusively.

    CAM hooks and gradients live on the module, so two tasks of one process must not drive the
    same module at once; tasks of different models (or processes) still run in parallel.
    """
    from tasks.models import load_model

    key = (model_config.model_dump_json(), config.device)
    with _lock:
        model_lock = _model_locks.setdefault(key, threading.Lock())
    with model_lock:
        if key not in _models:
            index = config.models.index(model_config)
            model = load_model(model_spec(config, model_config), field=f"models.{index}")
            model.module.to(resolve_device(config.device))
            _models[key] = model
        yield _models[key]


def model_spec(config: AuditConfig, model_config: ModelConfig):
    """The registry's spec for a configured model (the demo source is bound to the config's world)."""
    from tasks.models import ModelSpec

    fields = model_config.model_dump(exclude={"cam_layer", "layers"})
    spec = ModelSpec(**{**fields, "preprocess": model_config.preprocess})
    if model_config.source == "demo" and spec.path is None:
        from tasks.demo_model import ensure_demo_model

        spec = ModelSpec(**{**fields, "preprocess": model_config.preprocess, "path": str(ensure_demo_model(world_spec(config)))})
    return spec


def world_spec(config: AuditConfig):
    """The generator spec of the config's synthetic world."""
    from tasks.synthetic import WorldSpec

    return WorldSpec(**config.world.model_dump())
