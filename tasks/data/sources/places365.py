"""The CSAIL Places365 scene classifiers: ResNet18/ResNet50 checkpoints (``<arch>_places365.pth.tar``).

The checkpoint comes from the cache (``<cache>/places365``, downloaded when missing) or from a local
path or URL in ``weights``; class names from ``categories_places365.txt`` (``categories``, or beside
the checkpoint, or downloaded into the cache). Inputs: shorter side resized to 256, centre crop of
224, ImageNet's normalisation.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torchvision
from torch import nn

from xai_audit.tasks.core.cache import cache_root
from xai_audit.tasks.core.config import ModelConfig, WorldConfig
from xai_audit.tasks.core.errors import ConfigError
from xai_audit.tasks.data.sources.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSource,
    Problem,
    SourceModel,
    arch_problems,
    check_arch,
    meta_skeleton,
    standard_preprocess,
)
from xai_audit.tasks.data.weights import download, is_url, load_state_into, local_file, read_state_dict, url_filename

ARCHS = ("resnet18", "resnet50")
CLASSES = 365
RESIZE, CROP = 256, 224
URL = "http://places2.csail.mit.edu/models_places365/{arch}_places365.pth.tar"
CATEGORIES_FILE = "categories_places365.txt"
CATEGORIES_URL = f"https://raw.githubusercontent.com/csailvision/places365/master/{CATEGORIES_FILE}"


def read_categories(path: Path, field: str = "categories") -> list[str]:
    """Class names from ``categories_places365.txt``: ``/a/airfield 0`` -> ``airfield``.

    Names keep their sub-category as the official demo does (``/a/apartment_building/outdoor``
    -> ``apartment_building/outdoor``); lines are ordered by their index, which must run
    0..N-1.
    """
    try:
        lines = [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise ConfigError(field, f"{path} is not UTF-8 text: {exc.reason}") from None
    by_index: dict[int, str] = {}
    for number, parts in enumerate(lines, start=1):
        if len(parts) != 2 or not parts[1].isdigit():
            raise ConfigError(field, f"{path}:{number}: expected '/x/name INDEX', got {' '.join(parts)!r}")
        by_index[int(parts[1])] = re.sub(r"^/[^/]/", "", parts[0])
    if sorted(by_index) != list(range(len(lines))):
        raise ConfigError(field, f"{path}: indices must be 0..{len(lines) - 1}, each once")
    return [by_index[i] for i in range(len(lines))]


def _fetched_or_local(value: str, cache: Path, field: str, what: str) -> Path:
    if is_url(value):
        return download(value, cache / url_filename(value), field)
    return local_file(value, field, what)


class Places365Source(ModelSource):
    """CSAIL's Places365 ResNets: a torchvision architecture with 365 scene classes."""

    name = "places365"
    required = ("arch",)

    def load(self, model: ModelConfig, field: str, world: WorldConfig) -> SourceModel:
        arch = check_arch(model.arch or "resnet18", field, allowed=ARCHS)
        cache = cache_root() / "places365"
        checkpoint = _fetched_or_local(
            model.weights or URL.format(arch=arch), cache, f"{field}.weights", "Places365 checkpoint"
        )
        state = read_state_dict(checkpoint)
        if model.categories:
            categories = _fetched_or_local(model.categories, cache, f"{field}.categories", "categories file")
        elif (checkpoint.parent / CATEGORIES_FILE).is_file():
            categories = checkpoint.parent / CATEGORIES_FILE
        else:
            categories = download(CATEGORIES_URL, cache / CATEGORIES_FILE, f"{field}.categories")
        class_names = read_categories(categories, f"{field}.categories")
        module = torchvision.models.get_model(arch, weights=None, num_classes=len(class_names))
        load_state_into(module, state, str(checkpoint))
        preprocess = standard_preprocess(RESIZE, CROP, IMAGENET_MEAN, IMAGENET_STD)
        origin = {"source": self.name, "arch": arch}
        return SourceModel(module, preprocess, class_names, CROP, IMAGENET_MEAN, IMAGENET_STD, origin)

    def problems(self, model: ModelConfig, field: str) -> Iterator[Problem]:
        return arch_problems(model.arch, field, allowed=ARCHS)

    def skeleton(self, model: ModelConfig) -> nn.Module | None:
        return meta_skeleton(model.arch, CLASSES) if model.arch in ARCHS else None

    def geometry(self, model: ModelConfig) -> tuple[int, int] | None:
        return RESIZE, CROP
