"""timm models: ``arch`` is a timm model name, optionally with its pretrained tag
(``vit_tiny_patch16_224.augreg_in21k_ft_in1k``, ``test_vit.r160_in1k``); weights from a local file
(``path``) or, without one, from where timm's own download put them: the Hugging Face hub cache
(``$HF_HUB_CACHE``, ``models--timm--<name>/snapshots/*/model.safetensors`` or ``pytorch_model.bin``)
or, for models published by URL, the torch hub cache.

Nothing is downloaded: the files are read with safetensors or ``torch.load(weights_only=True)``
(:mod:`xai_audit.tasks.data.weights`) into ``timm.create_model(arch, pretrained=False)``. Preprocessing
(resize, crop, interpolation, mean, std) comes from the model's pretrained config through
``timm.data.resolve_data_config``/``create_transform``, class names from the label set timm infers
for it (``infer_imagenet_subset``: ImageNet-1k/-21k names), unless the entry gives ``class_names``
or ``num_classes`` (a fine-tuned head in a local file).
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xai_audit.tasks.core.config import ModelConfig, WorldConfig
from xai_audit.tasks.core.errors import ConfigError
from xai_audit.tasks.data.sources.base import ModelSource, Problem, SourceModel, configured_class_names
from xai_audit.tasks.data.weights import load_state_into, local_file, read_state_dict, url_filename

HUB_FILES = ("model.safetensors", "pytorch_model.bin")
"""The weights files timm looks for in a hub repository, in its order."""


@lru_cache(maxsize=1)
def timm_models() -> tuple[str, ...]:
    """Every model name timm can build (architectures, and architectures with pretrained tags)."""
    import timm

    return tuple(sorted({*timm.list_models(), *timm.list_pretrained()}))


def _check_name(arch: str | None, field: str) -> str:
    import timm

    if arch and timm.is_model(arch.partition(".")[0]) and (arch in timm_models() or "." not in arch):
        return arch
    close = difflib.get_close_matches(str(arch), timm_models(), n=3)
    first = f"closest: {', '.join(close)}; " if close else ""
    raise ConfigError(f"{field}.arch", f"unknown timm model {arch!r}; {first}see timm.list_pretrained()")


def _pretrained_cfg(arch: str) -> Any:
    from timm.models import get_pretrained_cfg

    return get_pretrained_cfg(arch, allow_unregistered=True)


def cached_weights(arch: str, field: str) -> Path:
    """The weights timm's download would have cached for ``arch``; ConfigError naming the expected place otherwise."""
    from huggingface_hub import constants, try_to_load_from_cache

    cfg = _pretrained_cfg(arch)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    url = getattr(cfg, "url", None) if cfg is not None else None
    if hub_id:
        for filename in HUB_FILES:
            found = try_to_load_from_cache(hub_id, filename)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
        folder = Path(constants.HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}"
        expected = f"{folder}/snapshots/<revision>/{HUB_FILES[0]} (or {HUB_FILES[1]})"
        where = f"hub repository {hub_id}"
    elif url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / url_filename(url)
        if path.is_file():
            return path
        expected, where = str(path), url
    else:
        raise ConfigError(f"{field}.path", f"timm publishes no weights for {arch!r}; give a local file in path")
    raise ConfigError(
        f"{field}.path",
        f"no cached weights for timm model {arch!r}: expected {expected} (timm's download of {where}); "
        "xai-audit does not download timm weights: fetch them where there is network (e.g. "
        "timm.create_model(..., pretrained=True)) and copy the cache, or give a local file in path",
    )


def _weights_file(model: ModelConfig, arch: str, field: str) -> Path:
    if model.path:
        return local_file(model.path, f"{field}.path", "timm weights file")
    return cached_weights(arch, field)


def _label_names(module: nn.Module) -> list[str]:
    """The names of the label set timm infers for the model's head, else ``class_i``."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(module)
    if subset:
        names = list(ImageNetInfo(subset).label_descriptions())
        if len(names) == module.num_classes:
            return names
    return [f"class_{i}" for i in range(module.num_classes)]


def _head_size(model: ModelConfig) -> dict[str, int]:
    """``num_classes`` for create_model when the entry states its own classes (a list or a count)."""
    listed = len(model.class_names) if isinstance(model.class_names, list) else None
    count = model.num_classes or listed
    return {"num_classes": count} if count else {}


class TimmSource(ModelSource):
    """A timm model with weights from timm's local cache or a local file; never downloads."""

    name = "timm"
    required = ("arch",)

    def load(self, model: ModelConfig, field: str, world: WorldConfig) -> SourceModel:
        import timm
        from timm.data import create_transform, resolve_data_config

        arch = _check_name(model.arch, field)
        file = _weights_file(model, arch, field)
        names = configured_class_names(model, field, required=False)
        module = timm.create_model(arch, pretrained=False, **({"num_classes": len(names)} if names else {}))
        load_state_into(module, read_state_dict(file), str(file))
        data = resolve_data_config({}, model=module)
        preprocess = create_transform(**data)
        origin = {"source": self.name, "arch": arch, "hf_hub_id": getattr(module.pretrained_cfg, "hf_hub_id", None)}
        return SourceModel(
            module,
            preprocess,
            names or _label_names(module),
            int(data["input_size"][-1]),
            tuple(data["mean"]),
            tuple(data["std"]),
            origin,
        )

    def problems(self, model: ModelConfig, field: str) -> Iterator[Problem]:
        try:
            arch = _check_name(model.arch, field)
            _weights_file(model, arch, field)
        except ConfigError as error:
            yield error.field, error.message

    def skeleton(self, model: ModelConfig) -> nn.Module | None:
        import timm

        try:
            arch = _check_name(model.arch, "model")
        except ConfigError:
            return None
        with torch.device("meta"):
            return timm.create_model(arch, pretrained=False, **_head_size(model))

    def geometry(self, model: ModelConfig) -> tuple[int, int] | None:
        from timm.data import resolve_data_config

        try:
            arch = _check_name(model.arch, "model")
        except ConfigError:
            return None
        cfg = _pretrained_cfg(arch)
        data = resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg is not None else {})
        size = int(data["input_size"][-1])
        return int(math.floor(size / data["crop_pct"])), size
