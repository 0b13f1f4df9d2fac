"""Network Dissection's thresholds are cached per (weights, probe set, quantile): a warm run skips
the thresholds pass and still writes the very same rows."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import xai_audit.tasks.dissect.netdissect as nd
from xai_audit.tasks.core.config import parse_config
from xai_audit.tasks.data.loaded_models import using_model
from xai_audit.tasks.dissect.probe import open_probe
from xai_audit.tasks.dissect.stage import model_layers, netdissect_rows

REPO = Path(__file__).resolve().parents[1]


def small_config(quantile: float) -> object:
    return parse_config(
        {
            "name": "nd-cache",
            "device": "cpu",
            "world": {"n_train": 1, "n_val": 12},
            "models": [
                {
                    "name": "tiny",
                    "source": "python",
                    "callable": "tests.fixtures.tiny_models:tiny_resnet",
                    "num_classes": 3,
                    "preprocess": {"resize": 64, "crop": 64},
                    "layers": ["layer2", "layer4"],
                }
            ],
            "dissect": {"methods": ["netdissect"], "probe": {"batch_size": 4}, "netdissect": {"quantile": quantile}},
        }
    )


@pytest.fixture
def quantile_passes(monkeypatch, tmp_path):
    """How many batches went through the thresholds' histogram (one per layer and batch), with a
    fresh cache and the repository importable (the model comes from tests.fixtures)."""
    monkeypatch.setenv("XAI_AUDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(REPO))
    calls: list[int] = []
    original = nd.UnitQuantile.update

    def counting(self, acts):
        calls.append(1)
        return original(self, acts)

    monkeypatch.setattr(nd.UnitQuantile, "update", counting)
    return calls


def dissect(config) -> dict[str, pd.DataFrame]:
    probe = open_probe(config)
    with using_model(config, config.models[0]) as model:
        return netdissect_rows(config, model, model_layers(model, config.models[0].layers), probe)


def test_a_warm_run_skips_the_thresholds_pass_and_gives_identical_rows(quantile_passes):
    config = small_config(0.01)
    cold = dissect(config)
    assert len(quantile_passes) == 2 * 3  # two layers, 12 images in batches of 4
    warm = dissect(config)
    assert len(quantile_passes) == 6  # nothing histogrammed again
    assert list(warm) == ["layer2", "layer4"]
    for layer in cold:
        pd.testing.assert_frame_equal(cold[layer], warm[layer], check_exact=True)


def test_another_quantile_computes_its_own_thresholds(quantile_passes):
    first = dissect(small_config(0.01))
    other = dissect(small_config(0.2))
    assert len(quantile_passes) == 12
    lower, higher = other["layer4"]["threshold"], first["layer4"]["threshold"]
    assert (lower <= higher).all() and (lower < higher).mean() > 0.9  # equal only where values tie (ReLU zeros)


def test_a_resume_over_fewer_layers_keeps_the_earlier_netdissect_error_rows(tmp_path):
    from xai_audit.storage.parquet import ResultsStore
    from xai_audit.tasks.dissect.stage import labelling_errors_unit

    store = ResultsStore(str(tmp_path))

    def rows(image_ids, layers):
        return [
            {
                "stage": "dissect",
                "item_id": image_id,
                "error_type": "NonFiniteActivationError",
                "model": "m",
                "message": f"NaN/Inf activations in {', '.join(layers)}",
            }
            for image_id in image_ids
        ]

    first_layers, resumed_layers = ["layer1", "layer2", "layer3"], ["layer3"]
    store.write("errors", "run", labelling_errors_unit("m", "netdissect", first_layers), rows(["a", "b"], first_layers))
    store.write("errors", "run", labelling_errors_unit("m", "netdissect", resumed_layers), rows(["c"], resumed_layers))
    store.write(
        "errors", "run", labelling_errors_unit("m", "netdissect", resumed_layers), rows(["c"], resumed_layers)
    )  # retried
    assert sorted(store.read("errors", "run")["item_id"]) == ["a", "b", "c"]
