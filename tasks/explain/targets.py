"""Which classes an image's maps explain: ``explain.target`` turned into class indices per image.

An explainer answers one target per image (:class:`xai_audit.tasks.explain.base.Explainer`); several targets
per image (``{topk: K}``, a list of class names) are handed to it as K passes over the batch, the
k-th pass explaining each image's k-th target. Every image has the same number of targets, so
the passes are whole batches.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence

import torch

from xai_audit.tasks.core.config import TargetSetting, TopKTarget
from xai_audit.tasks.core.errors import ConfigError

Problem = tuple[str, str]


def unknown_class_names(setting: TargetSetting, class_names: Sequence[str], model: str) -> Iterator[Problem]:
    """Problems of a class-name list naming a class ``model`` does not have, or a topk above its classes."""
    if isinstance(setting, TopKTarget) and setting.topk > len(class_names):
        yield "explain.target.topk", f"{setting.topk} targets but model {model!r} has {len(class_names)} classes"
    if not isinstance(setting, list):
        return
    known = set(class_names)
    for position, name in enumerate(setting):
        if name not in known:
            close = difflib.get_close_matches(name, list(class_names), n=3)
            hint = f"closest: {', '.join(close)}" if close else f"it has {len(class_names)} classes"
            yield f"explain.target.{position}", f"model {model!r} has no class {name!r}; {hint}"


def named_targets(setting: list[str], class_names: Sequence[str], model: str) -> list[int]:
    """The class indices of a class-name list; ConfigError naming the first unknown one."""
    for field, message in unknown_class_names(setting, class_names, model):
        raise ConfigError(field, message)
    return [list(class_names).index(name) for name in setting]


def target_count(setting: TargetSetting, n_classes: int) -> int:
    """How many targets (passes) each image gets."""
    if isinstance(setting, TopKTarget):
        return min(setting.topk, n_classes)
    return len(setting) if isinstance(setting, list) else 1


def image_targets(
    setting: TargetSetting,
    probabilities: torch.Tensor,
    true_labels: Sequence[int | None],
    class_names: Sequence[str],
    model: str,
) -> list[list[int]]:
    """``[K][B]``: the k-th target of each image, for ``probabilities [B, classes]``.

    ``predicted``: the top-1 class; ``label``: the image's label (images without one are refused
    earlier, when they are loaded); ``{topk: K}``: the K most probable classes, most probable first;
    a list of class names: those classes, in the list's order, for every image.
    """
    batch = probabilities.shape[0]
    if setting == "predicted":
        return [probabilities.argmax(dim=-1).tolist()]
    if setting == "label":
        return [[int(label) for label in true_labels]]
    if isinstance(setting, list):
        return [[index] * batch for index in named_targets(setting, class_names, model)]
    count = target_count(setting, probabilities.shape[1])
    top = probabilities.topk(count, dim=-1).indices.T.tolist() if batch else [[] for _ in range(count)]
    return [[int(t) for t in row] for row in top]
