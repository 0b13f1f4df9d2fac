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

from xai_audit.tasks.core.config import WorldConfig
from xai_audit.tasks.core.errors import CheckpointError
from xai_audit.tasks.world import demo_model
from xai_audit.tasks.world.demo_model import DemoTrainSpec, ensure_demo_model, load_demo_model
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
    assert correct / len(rows) >= 0.95


@pytest.mark.slow
def test_default_cam_layer_gives_at_least_4x4_maps(trained: tuple[torch.nn.Module, dict]) -> None:
    model, meta = trained
    maps = []
    handle = model.layer4.register_forward_hook(lambda m, i, o: maps.append(o))
    with torch.no_grad():
        model(torch.zeros(1, 3, meta["image_size"], meta["image_size"]))
    handle.remove()
    assert maps[0].shape[-2] >= 4 and maps[0].shape[-1] >= 4
