"""The registered names as plain strings, so a config's names are checked without importing torch.

Each registry (explainers, labellers, CLIP-Dissect similarities, model sources) imports its
implementations, and they import torch, open_clip or scikit-image: seconds before the first
answer. These tables hold the same names as ``"module:attr"`` strings of what implements them;
:func:`name_problems` checks a config against them in milliseconds (``xai-audit validate`` and
``run`` call it before anything heavy), and :func:`resolve` imports an entry on use.
tests/test_names.py keeps each table equal to its loaded registry, so adding a member still
means one module plus one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Collection, Iterator

from xai_audit.tasks.core.config import AuditConfig

_CAMS, _LABELLERS, _SIMILARITY = (
    "xai_audit.tasks.explain.cams:CamFamily",
    "xai_audit.tasks.dissect.labellers",
    "xai_audit.tasks.dissect.clip_dissect",
)

EXPLAIN_METHODS: dict[str, str] = {
    **{
        name: _CAMS
        for name in (
            "gradcam",
            "gradcam++",
            "xgradcam",
            "layercam",
            "hirescam",
            "eigencam",
            "scorecam",
            "ablationcam",
            "groupcam",
        )
    },
    "lime": "xai_audit.tasks.explain.lime:LimeExplainer",
    **{
        name: "xai_audit.tasks.explain.controls:ControlFamily"
        for name in ("control_random", "control_gaussian", "control_edges")
    },
}
"""``explain.methods`` name -> its family's class (:data:`xai_audit.tasks.explain.registry.EXPLAINERS`)."""

LABELLERS: dict[str, str] = {"clip_dissect": f"{_LABELLERS}:ClipDissect", "netdissect": f"{_LABELLERS}:NetDissect"}
"""``dissect.methods`` name -> its labeller class (:data:`xai_audit.tasks.dissect.labellers.LABELLERS`)."""

SIMILARITY_FUNCTIONS: dict[str, str] = {
    name: f"{_SIMILARITY}:{name}"
    for name in ("cos_similarity", "cos_similarity_cubed", "rank_reorder", "wpmi", "soft_wpmi")
}
"""``dissect.clip.similarity`` name -> its function
(:data:`xai_audit.tasks.dissect.clip_dissect.SIMILARITY_FUNCTIONS`)."""

MODEL_SOURCES: dict[str, str] = {
    "torchvision": "xai_audit.tasks.data.sources.torchvision:TorchvisionSource",
    "timm": "xai_audit.tasks.data.sources.timm:TimmSource",
    "places365": "xai_audit.tasks.data.sources.places365:Places365Source",
    "checkpoint": "xai_audit.tasks.data.sources.checkpoint:CheckpointSource",
    "python": "xai_audit.tasks.data.sources.python:PythonSource",
    "demo": "xai_audit.tasks.data.sources.demo:DemoSource",
}
"""``models[].source`` name -> its source class (:data:`xai_audit.tasks.data.sources.registry.SOURCES`)."""


def resolve(path: str) -> object:
    """The object a ``"module:attr"`` entry names, imported now."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def method_problems(
    config: AuditConfig,
    explainers: Collection[str] = EXPLAIN_METHODS,
    labellers: Collection[str] = LABELLERS,
    similarities: Collection[str] = SIMILARITY_FUNCTIONS,
) -> Iterator[tuple[str, str]]:
    """(field path, message) for every method name in ``config`` that its table does not hold: these
    light tables by default, the loaded registries in the full preflight (:func:`xai_audit.flows.preflight.check`)."""
    for field, names, table in (
        ("explain.methods", config.explain.methods, explainers),
        ("dissect.methods", config.dissect.methods, labellers),
    ):
        unknown = [name for name in names if name not in table]
        if unknown:
            yield field, f"unknown method(s) {unknown}; valid: {sorted(table)}"
    if config.dissect.clip.similarity not in similarities:
        yield (
            "dissect.clip.similarity",
            f"unknown similarity function {config.dissect.clip.similarity!r}; valid: {sorted(similarities)}",
        )


def name_problems(config: AuditConfig) -> Iterator[tuple[str, str]]:
    """(field path, message) for every name in ``config`` that no registry knows, as the full
    preflight words it (:func:`method_problems`, :func:`xai_audit.flows.preflight.model_problems`)."""
    yield from method_problems(config)
    for index, model in enumerate(config.models):
        if model.source not in MODEL_SOURCES:
            yield (
                f"models.{index}.source",
                f"unknown source {model.source!r}; valid: {', '.join(MODEL_SOURCES)}",
            )
