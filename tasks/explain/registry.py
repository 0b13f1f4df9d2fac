"""Config name -> explainer: the one place that lists the explanation methods.

A new family is one module defining an :class:`~xai_audit.tasks.explain.base.Explainer` plus one entry in
:data:`BUILTIN`; code outside the project (or a test) calls :func:`register`.
"""

from __future__ import annotations

from collections.abc import Sequence

from xai_audit.tasks.core.errors import ConfigError
from xai_audit.tasks.explain.base import Explainer
from xai_audit.tasks.explain.cams import CamFamily
from xai_audit.tasks.explain.controls import ControlFamily
from xai_audit.tasks.explain.lime import LimeExplainer

BUILTIN: tuple[Explainer, ...] = (CamFamily(), LimeExplainer(), ControlFamily())

EXPLAINERS: dict[str, Explainer] = {method: family for family in BUILTIN for method in family.methods}
"""Every registered method name -> the family that computes it."""


def register(family: Explainer) -> Explainer:
    """Add ``family``'s methods to the registry (a name already taken is an error, not an override)."""
    taken = sorted(set(family.methods) & set(EXPLAINERS))
    if taken:
        raise ValueError(f"explanation method(s) {taken} are registered already")
    EXPLAINERS.update({method: family for method in family.methods})
    return family


def unregister(family: Explainer) -> None:
    """Remove ``family``'s methods (tests that register a toy explainer clean up with this)."""
    for method in family.methods:
        if EXPLAINERS.get(method) is family:
            del EXPLAINERS[method]


def explainer(method: str) -> Explainer:
    """The family of ``method``; ConfigError naming the valid methods otherwise."""
    try:
        return EXPLAINERS[method]
    except KeyError:
        raise ConfigError(
            "explain.methods", f"unknown method {method!r}; valid: {', '.join(sorted(EXPLAINERS))}"
        ) from None


def control_methods() -> frozenset[str]:
    """The registered methods whose maps carry no model information (:attr:`Explainer.control`)."""
    return frozenset(method for method, family in EXPLAINERS.items() if family.control)


def families(methods: Sequence[str]) -> list[tuple[Explainer, list[str]]]:
    """``methods`` grouped by family, families and methods in config order."""
    grouped: dict[int, tuple[Explainer, list[str]]] = {}
    for method in methods:
        family = explainer(method)
        grouped.setdefault(id(family), (family, []))[1].append(method)
    return list(grouped.values())
