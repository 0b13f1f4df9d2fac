"""The demo spread's bookkeeping: bounds record their margins, and the report keeps the worst variant."""

from __future__ import annotations

import json

import pytest

from benchmarks.demo_spread import assertion_spread, junit_outcomes, markdown
from tests.fixtures.margins import MARGINS_ENV, assert_at_least, assert_at_most


def test_a_bound_records_its_value_and_margin_and_fails_below_it(tmp_path, monkeypatch):
    path = tmp_path / "margins.jsonl"
    monkeypatch.setenv(MARGINS_ENV, str(path))
    assert_at_least("accuracy", 0.97, 0.95)
    assert_at_most("p-value", 0.0005, 0.001)
    with pytest.raises(AssertionError, match="pointing: 0.8000 < 0.85"):
        assert_at_least("pointing", 0.8, 0.85)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(row["name"], row["kind"], row["bound"]) for row in rows] == [
        ("accuracy", ">=", 0.95),
        ("p-value", "<=", 0.001),
        ("pointing", ">=", 0.85),
    ]
    assert [row["margin"] for row in rows] == pytest.approx([0.02, 0.0005, -0.05])
    assert rows[0]["test"].endswith("test_demo_spread.py::test_a_bound_records_its_value_and_margin_and_fails_below_it")


def test_the_spread_reports_each_tests_outcome_and_the_smallest_margin_over_variants(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_sanity" name="test_controls">'
        '<failure message="pointing: 0.8 &lt; 0.85&#10;more"/></testcase>'
        '<testcase classname="tests.test_toy_clip" name="test_floors[a]"/>'
        "</testsuite></testsuites>"
    )
    outcomes = junit_outcomes(junit)
    assert outcomes == {
        "tests/test_sanity.py::test_controls": {"outcome": "failed", "message": "pointing: 0.8 < 0.85"},
        "tests/test_toy_clip.py::test_floors[a]": {"outcome": "passed", "message": ""},
    }
    row = {"test": "tests/test_sanity.py::test_controls", "name": "pointing", "kind": ">=", "bound": 0.85}
    variants = {
        "bf16=on,seed=0": {"margins": [{**row, "value": 0.9, "margin": 0.05}], "tests": outcomes},
        "bf16=off,seed=0": {"margins": [{**row, "value": 0.8, "margin": -0.05}], "tests": outcomes},
    }
    (entry,) = assertion_spread(variants)
    assert entry["values"] == {"bf16=on,seed=0": 0.9, "bf16=off,seed=0": 0.8}
    assert (entry["min_margin"], entry["min_variant"]) == (-0.05, "bf16=off,seed=0")
    for variant in variants.values():
        variant["models"] = {"demo_val_accuracy": 0.98, "toy_clip_zero_shot_val": dict(color=1, object=0.8, texture=1)}
    machine = {"cpu": "x", "cores": 2, "torch": "2", "cpu_kernels": "AVX512", "cpu_capability": "AVX512"}
    text = markdown(
        {"variants": variants, "assertions": [entry], "generated_at": "now", "machine": machine | {"bf16_flags": {}}}
    )
    assert "| `tests/test_sanity.py::test_controls` | **failed** | **failed** |" in text
    assert "| -0.05 (bf16=off,seed=0) |" in text
