"""The toy CLIP: a registered open_clip model that loads like a real one and reads the world."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from tests.fixtures.margins import assert_at_least
from xai_audit.tasks.core.config import WorldConfig
from xai_audit.tasks.world import toy_clip
from xai_audit.tasks.world.synthetic import describe, ensure_world
from xai_audit.tasks.world.toy_clip import (
    CHECKPOINT_NAME,
    TOY_CLIP_NAME,
    ClipTrainSpec,
    ensure_toy_clip,
    load_split,
    register_toy_clip,
    save_toy_clip,
    train_toy_clip,
    zero_shot_accuracy,
)

TINY_WORLD = WorldConfig(seed=9, n_train=16, n_val=8)
TINY_TRAIN = ClipTrainSpec(steps=2, batch_size=8, warmup_steps=1)
ATTRS = {"color": "red", "object": "star", "texture": "striped", "scene": "corner"}


def test_registration_is_idempotent_and_uses_the_standard_tokenizer() -> None:
    register_toy_clip()
    register_toy_clip()
    assert open_clip.list_models().count(TOY_CLIP_NAME) == 1
    tokenizer = open_clip.get_tokenizer(TOY_CLIP_NAME)
    assert isinstance(tokenizer, open_clip.SimpleTokenizer)
    context_length = json.loads(toy_clip.CONFIG_PATH.read_text())["text_cfg"]["context_length"]
    assert tokenizer("a red star").shape == (1, context_length)


def test_captions_name_exactly_the_mentioned_attributes() -> None:
    assert describe(ATTRS, frozenset({"object"})) == "a star"
    assert describe(ATTRS, frozenset({"color"})) == "a red shape"
    assert describe(ATTRS, frozenset({"texture"})) == "a striped background"
    assert describe(ATTRS, frozenset({"object"}), bare=True) == "star"
    full = describe(ATTRS, frozenset(ATTRS))
    assert full == "a red star on a striped background in a corner"


def test_partial_captions_are_positives_for_every_image_they_describe() -> None:
    codes = torch.tensor([[0, 3, 0, 1], [0, 1, 2, 0], [1, 3, 0, 1]])  # red star, red square, orange star
    stated = torch.tensor(
        [
            [0, -1, -1, -1],  # "a red shape": true of images 0 and 1
            [-1, 1, -1, -1],  # "a square": image 1 only
            [-1, 3, 0, -1],
        ]
    )  # "a star on a <texture 0> background": images 0 and 2
    expected = torch.tensor([[1.0, 0, 1], [1, 1, 0], [0, 0, 1]])
    assert torch.equal(toy_clip._soft_targets(codes, stated), expected)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, object, Path, Path]:
    world = ensure_world(TINY_WORLD)
    model, preprocess, _ = train_toy_clip(world, TINY_TRAIN)
    checkpoint = save_toy_clip(model, {"note": "tiny"}, tmp_path_factory.mktemp("clip") / "clip")
    return model, preprocess, checkpoint, world


def test_create_model_and_transforms_round_trips_the_checkpoint(tiny_clip) -> None:
    model, preprocess, checkpoint, world = tiny_clip
    images, _ = load_split(world, "val", preprocess)
    loaded, _, loaded_preprocess = open_clip.create_model_and_transforms(TOY_CLIP_NAME, pretrained=str(checkpoint))
    assert isinstance(loaded, open_clip.CLIP)
    from_disk, _ = load_split(world, "val", loaded_preprocess)
    assert torch.equal(from_disk, images)
    with torch.no_grad():
        assert torch.allclose(loaded.eval().encode_image(from_disk), model.eval().encode_image(images), atol=1e-5)
        tokens = open_clip.get_tokenizer(TOY_CLIP_NAME)(["a red star", "striped"])
        assert torch.allclose(loaded.encode_text(tokens), model.encode_text(tokens), atol=1e-5)


def test_checkpoint_folder_also_loads_as_local_dir(tiny_clip) -> None:
    model, _, checkpoint, _ = tiny_clip
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{checkpoint.parent}")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.eval().encode_image(x), model.eval().encode_image(x), atol=1e-5)


def test_ensure_toy_clip_caches_beside_its_meta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XAI_AUDIT_CACHE", str(tmp_path))
    checkpoint = ensure_toy_clip(TINY_WORLD, TINY_TRAIN)
    assert checkpoint.name == CHECKPOINT_NAME and checkpoint.is_file()
    meta = json.loads((checkpoint.parent / "meta.json").read_text())
    assert set(meta["zero_shot_val"]) == {"color", "object", "texture"}
    assert meta["train_seconds"] >= 0

    def fail(*args: object) -> None:
        raise AssertionError("a cached toy CLIP was trained again")

    monkeypatch.setattr(toy_clip, "train_toy_clip", fail)
    assert ensure_toy_clip(TINY_WORLD, TINY_TRAIN) == checkpoint


@pytest.mark.slow
@pytest.mark.toy_clip
def test_toy_clip_meets_the_zero_shot_floors() -> None:
    """Held-out zero-shot accuracy, computed here from the saved checkpoint via open_clip."""
    scores = zero_shot_accuracy(ensure_toy_clip(), ensure_world(), split="val")
    assert_at_least("zero-shot colour accuracy", scores["color"], 0.90)
    assert_at_least("zero-shot texture accuracy", scores["texture"], 0.90)
    assert_at_least("zero-shot shape accuracy", scores["object"], 0.70)


def test_the_toy_clip_is_created_without_the_false_random_weights_warning(caplog):
    """open_clip warns "initialized randomly" for a model without pretrained weights; while the toy
    CLIP that is about to be trained is created, that warning is dropped (it would alarm users)."""
    import logging

    import open_clip

    from xai_audit.tasks.world.toy_clip import TOY_CLIP_NAME, _quiet_random_init, register_toy_clip

    register_toy_clip()
    with caplog.at_level(logging.WARNING):
        open_clip.create_model_and_transforms(TOY_CLIP_NAME)
    assert any("initialized randomly" in record.getMessage() for record in caplog.records)  # the warning is real
    caplog.clear()
    with caplog.at_level(logging.WARNING), _quiet_random_init():
        open_clip.create_model_and_transforms(TOY_CLIP_NAME)
    assert not any("initialized randomly" in record.getMessage() for record in caplog.records)
    assert not [f for f in logging.getLogger().filters if type(f).__name__ == "_NotRandomInit"]  # removed again
