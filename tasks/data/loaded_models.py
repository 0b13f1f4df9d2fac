"""A per-process cache of loaded models, shared by the tasks of one worker process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from xai_audit.tasks.compute.device import resolve_device
from xai_audit.tasks.core.config import AuditConfig, ModelConfig
from xai_audit.tasks.data.models import LoadedModel, load_model

_models: dict[tuple[str, str, str], LoadedModel] = {}
_model_locks: dict[tuple[str, str, str], threading.Lock] = {}
_lock = threading.Lock()


@contextmanager
def using_model(config: AuditConfig, model_config: ModelConfig) -> Iterator[LoadedModel]:
    """The model of ``model_config`` on the run's device, loaded once per process, held exclusively.

    CAM hooks and gradients live on the module, so two tasks of one process must not drive the
    same module at once; tasks of different models (or processes) still run in parallel. The world
    is part of the key because the demo source loads the model trained on the run's world.
    """
    key = (model_config.model_dump_json(), config.world.model_dump_json(), config.device)
    with _lock:
        model_lock = _model_locks.setdefault(key, threading.Lock())
    with model_lock:
        if key not in _models:
            index = config.models.index(model_config)
            model = load_model(model_config, field=f"models.{index}", world=config.world)
            model.module.to(resolve_device(config.device))
            _models[key] = model
        yield _models[key]
