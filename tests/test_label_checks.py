"""The final-layer label self-test (tasks/dissect/label_checks.py) on classifiers whose output
units we built, and its measured value on the demo model.

The CLIP-Dissect paper (Oikarinen & Weng, ICLR 2023, sec. 4) evaluates its labels on the final
layer, where output unit k's true concept is class k; the reference code records that layer's
output unpooled (``utils.get_activation``: 2-D outputs pass as they are) and compares labels with
class names by accuracy and by CLIP text cosine (``utils.get_cos_similarity``).
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from tests.fixtures.margins import assert_at_least
from tests.fixtures.planted_models import PREPROCESS
from xai_audit.tasks.core.config import parse_config
from xai_audit.tasks.core.errors import ConfigError
from xai_audit.tasks.dissect.label_checks import final_layer_accuracy, final_layer_rows, output_layer
from xai_audit.tasks.world.synthetic import COLORS


def test_final_layer_rows_score_labels_against_class_names():
    """Three output units whose scores pick classes 0, 2, 2: units 0 and 2 are correct; with
    orthonormal text embeddings the text cosine is 1 for a correct label and 0 otherwise."""
    scores = torch.tensor([[5.0, 1.0, 0.0], [0.0, 1.0, 3.0], [0.0, 0.0, 2.0]])
    names = ["Circle", "square", "star"]
    text = torch.eye(3)
    rows = final_layer_rows(scores, ["circle", "square", "star"], names, text, text * 2)
    assert rows["concept"].tolist() == ["circle", "star", "star"]
    assert rows["tied_with"].tolist() == [[], [], []] and rows["class_in_tie"].tolist() == [True, False, True]
    tied = final_layer_rows(torch.tensor([[2.0, 2.0, 0.0]]), ["star", "circle", "cross"], ["circle"], text, text[1:2])
    assert (tied["concept"][0], tied["tied_with"][0], tied["correct"][0], tied["class_in_tie"][0]) == (
        "star",
        ["circle"],
        False,
        True,
    )
    assert rows["correct"].tolist() == [True, False, True]  # case-insensitive, as class names vary
    assert rows["text_similarity"].tolist() == pytest.approx([1.0, 0.0, 1.0])
    assert final_layer_accuracy(rows) == pytest.approx((2 / 3, 2 / 3))


def test_output_layer_is_the_last_linear_with_one_output_per_class():
    """torchvision-style heads are found; a model without such a head is a ConfigError naming it."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    assert output_layer(model, 3) == "4"
    with pytest.raises(ConfigError, match="last nn.Linear with 5 outputs"):
        output_layer(model, 5)
    with pytest.raises(ConfigError, match="there is none"):
        output_layer(nn.Sequential(nn.Conv2d(3, 3, 1)), 3)


def _colour_config(callable_name: str):
    model = {
        "name": callable_name,
        "source": "python",
        "callable": f"tests.fixtures.planted_models:{callable_name}",
        "class_names": list(COLORS),
        "preprocess": dict(PREPROCESS),
    }
    return parse_config({"device": "cpu", "models": [model], "dissect": {"probe": {"limit": 200}}})


def _final_layer(config):
    from xai_audit.tasks.data.loaded_models import using_model
    from xai_audit.tasks.dissect.probe import open_probe
    from xai_audit.tasks.dissect.stage import final_layer_check_rows

    with using_model(config, config.models[0]) as model:
        return final_layer_check_rows(config, model, open_probe(config))


@pytest.mark.slow
@pytest.mark.toy_clip
def test_exact_class_detectors_pass_the_final_layer_test_and_a_shuffled_head_fails_it():
    """Output units that are exact detectors of their class (colour k) get accuracy 1 and text
    similarity 1 with the class names as concepts (and with the world's concept set, which holds
    the colours); the same units behind a head shifted by 3 get accuracy 0, each labelled with
    the colour it really detects."""
    rows = _final_layer(_colour_config("planted_colour_classifier"))
    classes = rows[rows["concept_set"] == "classes"]
    assert (rows["layer"] == "head").all() and len(classes) == len(COLORS)
    assert final_layer_accuracy(classes) == pytest.approx((1.0, 1.0))
    world = rows[rows["concept_set"] == "world"]
    assert final_layer_accuracy(world)[0] == 1.0

    shifted = _final_layer(_colour_config("shifted_colour_classifier"))
    shifted = shifted[shifted["concept_set"] == "classes"]
    assert final_layer_accuracy(shifted)[0] == 0.0
    assert shifted["concept"].tolist() == [COLORS[(k + 3) % len(COLORS)] for k in range(len(COLORS))]
    assert final_layer_accuracy(shifted)[1] < 0.9


@pytest.mark.slow
@pytest.mark.demo_model
@pytest.mark.toy_clip
def test_demo_model_final_layer_accuracy_with_the_toy_clip():
    """The demo ResNet18's five output units, CLIP-Dissect with the toy CLIP and soft-WPMI on the
    demo's 500 probe images. With the class names as concepts: accuracy 1.0 (5/5), each unit's own
    class alone at soft-WPMI's cap log 5, the others ≥ 185 below (the issue's goal is ≥ 0.9).
    With the world's 20 concepts, soft-WPMI's cap is reached by several concepts per unit (the
    circle unit: circle, striped, checkered), so top-1 is a pick among ties (measured 3/5); the
    class is among the tied labels for every unit."""
    import yaml

    raw = yaml.safe_load(open("configs/demo.yaml"))
    raw["device"] = "cpu"
    rows = _final_layer(parse_config(raw))
    classes, world = (rows[rows["concept_set"] == name] for name in ("classes", "world"))
    accuracy, text = final_layer_accuracy(classes)
    print(f"demo final layer, class names: accuracy {accuracy:.3f}, text similarity {text:.3f}")
    print(
        f"demo final layer, world concepts: accuracy {final_layer_accuracy(world)}, ties {world['tied_with'].tolist()}"
    )
    assert_at_least("final-layer accuracy with the class names", accuracy, 0.9)
    assert not classes["tied_with"].map(len).any(), classes
    assert world["class_in_tie"].all(), world


@pytest.mark.slow
@pytest.mark.toy_clip
def test_audit_writes_label_checks_p_values_and_their_summaries(prefect_harness, tmp_path):
    """A dissect-only audit of the exact-detector classifier with p-values on: ``label_checks``
    holds one row per output unit and concept set, ``summary_label_checks`` accuracy 1 for the
    class names, every ``neurons`` row a p-value, ``summary_layers`` counts the ten planted
    detectors (of 11 units; the constant unit is p = 1) as significant, and the digest says so."""
    from xai_audit.flows.audit import run_audit
    from xai_audit.storage.parquet import ResultsStore
    from xai_audit.tasks.results.findings import run_findings

    config = _colour_config("planted_colour_classifier").model_dump()
    config["models"][0]["layers"] = ["detectors"]
    config["dissect"] |= {"methods": ["clip_dissect"], "significance": {"permutations": 200}}
    outcome = run_audit(parse_config(config), str(tmp_path), stages=("dissect",))
    assert outcome.status == "completed", outcome
    store = ResultsStore(str(tmp_path))
    checks = store.read("label_checks", outcome.run_id)
    assert sorted(checks["concept_set"].value_counts().items()) == [("classes", 8), ("world", 8)]
    summary = store.read("summary_label_checks", outcome.run_id).set_index("concept_set")
    assert summary.loc["classes", "accuracy"] == 1.0 and summary.loc["classes", "correct"] == 8
    neurons = store.read("neurons", outcome.run_id)
    assert neurons["p_value"].notna().all() and len(neurons) == 11
    layers = store.read("summary_layers", outcome.run_id).iloc[0]
    assert (layers["tested"], layers["significant"]) == (11, 10)
    digest = "\n".join(run_findings(store, outcome.run_id))
    assert "10/11 significant" in digest and "accuracy 1.000 (8/8" in digest


def _cache_without_activations(monkeypatch, shared, folder) -> None:
    """A cache in ``folder`` holding the ``shared`` cache's world, probe listings and CLIP features
    (links) but no pooled activations, so every activation pass shows."""
    folder.mkdir()
    for entry in shared.iterdir():
        if entry.is_dir() and entry.name != "activations":
            (folder / entry.name).symlink_to(entry, target_is_directory=True)
    monkeypatch.setenv("XAI_AUDIT_CACHE", str(folder))


@pytest.mark.slow
@pytest.mark.toy_clip
@pytest.mark.parametrize("check_first", [False, True])
def test_the_final_layer_check_shares_clip_dissects_activation_pass(monkeypatch, tmp_path, check_first):
    """CLIP-Dissect's labelling and the final-layer check of one model take one pass over the
    probe set together, whichever runs first (the output layer joins the labelled layers), and
    the check's rows are those of the check taking its own pass over the output layer alone."""
    from xai_audit.tasks.core.cache import cache_root
    from xai_audit.tasks.data.loaded_models import using_model
    from xai_audit.tasks.dissect import activations
    from xai_audit.tasks.dissect.labellers import labeller
    from xai_audit.tasks.dissect.probe import open_probe
    from xai_audit.tasks.dissect.stage import final_layer_check_rows

    raw = _colour_config("planted_colour_classifier").model_dump()
    raw["dissect"]["probe"]["limit"] = 100  # soft-WPMI averages over the 100 most activating images
    config = parse_config(raw)
    passes, one_pass, shared_cache = [], activations.pooled_activations, cache_root()

    def counted_pass(module, layers, *args, **kwargs):
        passes.append(list(layers))
        return one_pass(module, layers, *args, **kwargs)

    monkeypatch.setattr(activations, "pooled_activations", counted_pass)
    _cache_without_activations(monkeypatch, shared_cache, tmp_path / "alone")
    alone = _final_layer(config)
    assert passes == [["head"]]

    passes.clear()
    _cache_without_activations(monkeypatch, shared_cache, tmp_path / "shared")
    probe = open_probe(config)
    with using_model(config, config.models[0]) as model:
        label = lambda: labeller("clip_dissect").label(config, model, ["detectors"], ["detectors"], probe)  # noqa: E731
        check = lambda: final_layer_check_rows(config, model, probe, ["detectors"])  # noqa: E731
        if check_first:
            shared = check()
            labels = label()
        else:
            labels = label()
            shared = check()
    assert passes == [["detectors", "head"]]
    assert list(labels.frames) == ["detectors"] and len(labels.frames["detectors"]) == 11
    pd.testing.assert_frame_equal(shared, alone)
