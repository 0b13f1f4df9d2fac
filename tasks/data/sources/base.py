"""What every model source answers, and the pieces several sources share.

A source turns a ``models[]`` entry of the config into an eval-ready module plus what it takes to
feed it (preprocessing), name its outputs (class names) and tell it apart (its origin, part of the
model's identity). Without loading any weights it also answers what preflight and the report ask:
the entry's problems, a weightless skeleton whose layer names preflight checks, and the resize and
crop its preprocessing applies.
"""

from __future__ import annotations

import difflib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms as T

from xai_audit.tasks.core.config import ModelConfig, PreprocessConfig, WorldConfig
from xai_audit.tasks.core.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Problem = tuple[str, str]
"""(field path, message), as preflight collects them."""


@dataclass(frozen=True)
class SourceModel:
    """What a source loads: the module, how to feed it, its class names, and where it came from."""

    module: nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    class_names: list[str]
    input_size: int
    mean: Sequence[float]
    std: Sequence[float]
    origin: dict[str, Any]
    """What the weights are (source, arch, ...); with their hash it makes the model's identity."""


class ModelSource(ABC):
    """One place models come from; the only code that knows that place's files, classes and inputs."""

    name: str = ""
    """The ``models[].source`` value this source answers."""
    required: tuple[str, ...] = ()
    """``models[]`` fields an entry of this source must set."""
    trained_on_world: bool = False
    """Whether its models learnt the synthetic world, so the world's probe set and concepts describe them."""

    def missing_fields(self, model: ModelConfig, field: str) -> Iterator[Problem]:
        """The problem of an entry that leaves out a field this source needs."""
        missing = [name for name in self.required if getattr(model, name) is None]
        if missing:
            yield field, f"source '{self.name}' needs {', '.join(missing)}"

    @abstractmethod
    def load(self, model: ModelConfig, field: str, world: WorldConfig) -> SourceModel:
        """Load ``model`` (``field`` prefixes error field paths; ``world`` is the run's synthetic world).

        Raises :class:`ConfigError` for bad entries or missing files, :class:`CheckpointError` for
        unsafe, truncated or mismatching weights.
        """

    def problems(self, model: ModelConfig, field: str) -> Iterator[Problem]:
        """Problems found without loading anything (unknown architectures or weights)."""
        return iter(())

    def skeleton(self, model: ModelConfig) -> nn.Module | None:
        """The architecture on the meta device (layer names, no weights); None when only loading tells."""
        return None

    def built(self, model: ModelConfig, field: str) -> nn.Module | None:
        """The module as loading builds and checks it, for sources where that needs no weights file or
        download (a user's factory, which only running tells about): preflight checks its layer names.
        None for the others. Raises :class:`ConfigError` as loading does."""
        return None

    def geometry(self, model: ModelConfig) -> tuple[int, int] | None:
        """(resize, crop) of the preprocessing; None when the input is the image's centre square at any
        size (resize == crop) or unknown without loading."""
        return None

    def class_names(self, model: ModelConfig) -> list[str] | None:
        """The model's class names as far as they are known without loading it (preflight checks
        ``explain.target``'s class names against them): the entry's ``class_names`` or ``num_classes``
        by default; None when only loading tells."""
        try:
            return configured_class_names(model, "model", required=False)
        except ConfigError:
            return None


def torchvision_archs() -> list[str]:
    """torchvision's classification architectures: what ``arch`` may name."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_arch(arch: str | None, field: str, allowed: Sequence[str] | None = None) -> str:
    """``arch`` when it is one of ``allowed`` (default: every torchvision classifier), else ConfigError."""
    valid = list(allowed) if allowed is not None else torchvision_archs()
    if arch not in valid:
        close = difflib.get_close_matches(str(arch), valid, n=3)
        first = f"closest: {', '.join(close)}; " if close else ""
        raise ConfigError(f"{field}.arch", f"unknown architecture {arch!r}; {first}valid: {', '.join(valid)}")
    return arch


def arch_problems(arch: str | None, field: str, allowed: Sequence[str] | None = None) -> Iterator[Problem]:
    """:func:`check_arch`'s refusal as a problem, so preflight and loading say the same."""
    try:
        check_arch(arch, field, allowed)
    except ConfigError as error:
        yield error.field, error.message


def meta_skeleton(arch: str | None, num_classes: int | None = None) -> nn.Module | None:
    """torchvision's ``arch`` on the meta device, or None for an unknown ``arch`` (a problem already)."""
    if arch not in torchvision_archs():
        return None
    with torch.device("meta"):
        return torchvision.models.get_model(arch, **({"num_classes": num_classes} if num_classes else {}))


def standard_preprocess(resize: int, crop: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Shorter side to ``resize``, centre crop ``crop``, tensor, normalised: the usual classifier input."""
    return T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), T.Normalize(list(mean), list(std))])


def configured_preprocess(pre: PreprocessConfig, field: str) -> tuple[T.Compose, int, Sequence[float], Sequence[float]]:
    """The entry's own preprocessing (sources whose weights bring none): transform, input size, mean, std."""
    if pre.resize <= 0 or pre.crop <= 0 or pre.crop > pre.resize:
        raise ConfigError(f"{field}.preprocess", f"need 0 < crop <= resize, got resize={pre.resize}, crop={pre.crop}")
    if len(pre.mean) != 3 or len(pre.std) != 3 or any(s <= 0 for s in pre.std):
        raise ConfigError(f"{field}.preprocess", "mean and std need three values each, std > 0")
    return standard_preprocess(pre.resize, pre.crop, pre.mean, pre.std), pre.crop, pre.mean, pre.std


def configured_class_names(model: ModelConfig, field: str, required: bool) -> list[str] | None:
    """The entry's ``class_names`` (a list or a file, one per line), else ``class_i`` for ``num_classes``.

    None when neither is given and ``required`` is false (the source has a default of its own).
    """
    names = model.class_names
    if isinstance(names, (str, os.PathLike)):
        path = Path(names).expanduser()
        if not path.is_file():
            raise ConfigError(f"{field}.class_names", f"{path} is not a file (expected one class name per line)")
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{field}.class_names", f"{path} is not UTF-8 text: {exc.reason}") from None
    if names is not None:
        names = [str(n) for n in names]
        if model.num_classes is not None and len(names) != model.num_classes:
            raise ConfigError(
                f"{field}.class_names", f"{len(names)} class names but num_classes is {model.num_classes}"
            )
        if not names:
            raise ConfigError(f"{field}.class_names", "empty list of class names")
        return names
    if model.num_classes is not None:
        if model.num_classes <= 0:
            raise ConfigError(f"{field}.num_classes", f"must be positive, got {model.num_classes}")
        return [f"class_{i}" for i in range(model.num_classes)]
    if required:
        raise ConfigError(f"{field}.class_names", "give class_names (a list or a file) or num_classes")
    return None
