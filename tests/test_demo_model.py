"""The demo model: trained once per cache, loadable, and it really names the held-out shapes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision.models import resnet18

from tests.fixtures.margins import assert_at_least
from xai_audit.tasks.core.config import WorldConfig
from xai_audit.tasks.core.errors import CheckpointError, ConfigError
from xai_audit.tasks.world import demo_model, toy_clip
from xai_audit.tasks.world.demo_model import DemoTrainSpec, ensure_demo_model, load_demo_model
from xai_audit.tasks.world.recipe import RECIPE_ENV, DemoRecipe, parse_recipe
from xai_audit.tasks.world.synthetic import SHAPES, ensure_world

TINY_WORLD = WorldConfig(seed=7, n_train=16, n_val=8)
TINY_TRAIN = DemoTrainSpec(epochs=1, batch_size=8)


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XAI_AUDIT_CACHE", str(tmp_path))
    return tmp_path


def test_cache_entry_is_loadable_and_reused(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = ensure_demo_model(TINY_WORLD, TINY_TRAIN)
    model, meta = load_demo_model(path)
    assert meta["arch"] == "resnet18" and meta["class_names"] == list(SHAPES)
    assert meta["image_size"] == TINY_WORLD.image_size
    assert {"mean", "std", "val_accuracy", "train_seconds"} <= meta.keys()
    assert not model.training

    def fail(*args: object) -> None:
        raise AssertionError("a cached demo model was trained again")

    monkeypatch.setattr(demo_model, "train_demo_model", fail)
    assert ensure_demo_model(TINY_WORLD, TINY_TRAIN) == path


def test_killed_training_leaves_no_cache_entry(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def killed(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_model, "train_demo_model", killed)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_model(TINY_WORLD, TINY_TRAIN)
    assert not list((isolated_cache / "demo_model").rglob("meta.json"))
    assert not list((isolated_cache / "demo_model").rglob("*.safetensors"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", DemoRecipe(bf16=True, seed=0)),
        ("bf16=off", DemoRecipe(bf16=False, seed=0)),
        (" seed = 2 , bf16=ON ", DemoRecipe(bf16=True, seed=2)),
        ("bf16=false,seed=1", DemoRecipe(bf16=False, seed=1)),
    ],
)
def test_recipe_variants_parse_from_their_spelling(text: str, expected: DemoRecipe) -> None:
    assert parse_recipe(text) == expected
    assert parse_recipe(expected.label()) == expected


@pytest.mark.parametrize(
    ("text", "named"), [("bf16=maybe", "bf16='maybe'"), ("seed=-1", "seed='-1'"), ("epochs=9", "'epochs=9'")]
)
def test_a_malformed_recipe_names_the_variable_the_value_and_the_valid_form(text: str, named: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_recipe(text)
    assert error.value.field == RECIPE_ENV and named in error.value.message and "bf16=on|off" in error.value.message


def test_the_recipe_variable_selects_what_both_demo_models_train_by_default(
    isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an explicit spec, the demo model and the toy CLIP train the variant the variable
    names (its own cache entry); an explicit spec is trained as given."""
    trained = []

    def record(world_root: Path, spec: object) -> None:
        trained.append(spec)
        raise KeyboardInterrupt  # stop before any training

    monkeypatch.setattr(demo_model, "train_demo_model", record)
    monkeypatch.setattr(toy_clip, "train_toy_clip", record)
    monkeypatch.setattr(demo_model, "ensure_world", lambda world: isolated_cache)
    monkeypatch.setattr(toy_clip, "ensure_world", lambda world: isolated_cache)
    monkeypatch.setenv(RECIPE_ENV, "bf16=off,seed=2")
    for ensure in (demo_model.ensure_demo_model, toy_clip.ensure_toy_clip, lambda w: ensure_demo_model(w, TINY_TRAIN)):
        with pytest.raises(KeyboardInterrupt):
            ensure(TINY_WORLD)
    assert [(type(spec).__name__, spec.bf16, spec.seed) for spec in trained] == [
        ("DemoTrainSpec", False, 2),
        ("ClipTrainSpec", False, 2),
        ("DemoTrainSpec", True, 0),
    ]
    assert trained[0] == DemoTrainSpec(bf16=False, seed=2)
    assert trained[1] == toy_clip.ClipTrainSpec(bf16=False, seed=2)


def test_load_refuses_weights_of_another_architecture(tmp_path: Path) -> None:
    save_file(resnet18(num_classes=3).state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "meta.json").write_text(json.dumps({"class_names": list(SHAPES)}))
    with pytest.raises(CheckpointError, match="resnet18"):
        load_demo_model(tmp_path)


@pytest.fixture(scope="session")
def trained() -> tuple[torch.nn.Module, dict]:
    """The default demo model, trained once into the test cache and reused across sessions."""
    return load_demo_model(ensure_demo_model())


@pytest.mark.slow
@pytest.mark.demo_model
def test_demo_model_names_held_out_shapes(trained: tuple[torch.nn.Module, dict]) -> None:
    """Accuracy measured here, from the PNGs and the ground-truth table, not read from meta.json."""
    model, meta = trained
    root = ensure_world()
    with (root / "attributes.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "val"]
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(rows), 100):
            chunk = rows[start : start + 100]
            pixels = np.stack([np.asarray(Image.open(root / "images" / r["image"]).convert("RGB")) for r in chunk])
            x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
            predicted = model(x).argmax(1).tolist()
            correct += sum(meta["class_names"][p] == r["object"] for p, r in zip(predicted, chunk))
    assert len(rows) >= 500
    assert_at_least("accuracy on the held-out split", correct / len(rows), 0.95)


@pytest.mark.slow
@pytest.mark.demo_model
def test_default_cam_layer_gives_at_least_4x4_maps(trained: tuple[torch.nn.Module, dict]) -> None:
    model, meta = trained
    maps = []
    handle = model.layer4.register_forward_hook(lambda m, i, o: maps.append(o))
    with torch.no_grad():
        model(torch.zeros(1, 3, meta["image_size"], meta["image_size"]))
    handle.remove()
    assert maps[0].shape[-2] >= 4 and maps[0].shape[-1] >= 4
