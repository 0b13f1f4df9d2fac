"""The light name tables (xai_audit.tasks.core.names) against the registries they stand in for: same names,
each entry resolving to what the registry actually holds, and the same problems found."""

from __future__ import annotations

import pytest

from xai_audit.flows.preflight import model_problems, registry_problems
from xai_audit.tasks.core import names
from xai_audit.tasks.core.config import parse_config
from xai_audit.tasks.data.sources.registry import SOURCES
from xai_audit.tasks.dissect.clip_dissect import SIMILARITY_FUNCTIONS
from xai_audit.tasks.dissect.labellers import LABELLERS
from xai_audit.tasks.explain.registry import EXPLAINERS


@pytest.mark.parametrize(
    ("table", "registry", "implementation"),
    [
        (names.EXPLAIN_METHODS, EXPLAINERS, type),
        (names.LABELLERS, LABELLERS, type),
        (names.MODEL_SOURCES, SOURCES, type),
        (names.SIMILARITY_FUNCTIONS, SIMILARITY_FUNCTIONS, None),
    ],
    ids=["explainers", "labellers", "sources", "similarities"],
)
def test_each_light_table_names_exactly_what_its_registry_loads(table, registry, implementation):
    assert sorted(table) == sorted(registry)
    for name, path in table.items():
        loaded = registry[name] if implementation is None else type(registry[name])
        assert names.resolve(path) is loaded, name


@pytest.mark.parametrize(
    "data",
    [
        {"explain": {"methods": ["gradcam", "telepathy"]}},
        {"dissect": {"methods": ["clip_dissect", "phrenology"]}},
        {"dissect": {"clip": {"similarity": "cosine"}}},
        {"models": [{"name": "m", "source": "hub"}]},
        {},
    ],
)
def test_light_checks_find_what_the_full_preflight_finds(data):
    config = parse_config(data)
    full = list(registry_problems(config))
    full += [problem for index, model in enumerate(config.models) for problem in model_problems(index, model)]
    light = list(names.name_problems(config))
    assert sorted(light) == sorted(full) and len(light) == len(data)  # one bad name per config, same words
