"""The metrics every explain chunk computes, in order: the one place that lists them.

A new metric is one module defining a :class:`~xai_audit.tasks.metrics.base.Metric` plus one entry in
:data:`BUILTIN`; code outside the project (or a test) calls :func:`register`.
"""

from __future__ import annotations

from xai_audit.tasks.metrics.agreement import Agreement
from xai_audit.tasks.metrics.base import Metric, Score
from xai_audit.tasks.metrics.faithfulness import Faithfulness
from xai_audit.tasks.metrics.localization import Localization

BUILTIN: tuple[Metric, ...] = (Agreement(), Localization(), Faithfulness())

METRICS: dict[str, Metric] = {metric.name: metric for metric in BUILTIN}
"""Every registered metric by name, in the order chunks compute them."""


def register(metric: Metric) -> Metric:
    """Add ``metric`` (a name already taken is an error, not an override)."""
    if metric.name in METRICS:
        raise ValueError(f"metric {metric.name!r} is registered already")
    METRICS[metric.name] = metric
    return metric


def unregister(metric: Metric) -> None:
    """Remove ``metric`` (tests that register a toy metric clean up with this)."""
    if METRICS.get(metric.name) is metric:
        del METRICS[metric.name]


def summary_scores() -> list[tuple[Metric, Score]]:
    """Every registered value with its metric, in registry order (what leaderboards show)."""
    return [(metric, score) for metric in METRICS.values() for score in metric.scores]
