"""``source: timm``: a timm model from timm's local (Hugging Face hub) cache or a local file, never downloaded.

The cache is prepared the way ``timm.create_model(..., pretrained=True)`` leaves it
(``models--timm--<name>/refs/main`` naming a snapshot that holds ``model.safetensors``: huggingface_hub's
cache layout), with random weights under the published name ``test_vit.r160_in1k`` (timm's smallest
published ViT, 0.4 M parameters). The reference for every output is timm itself: the same architecture
built by ``timm.create_model`` with the same state dict loaded by ``load_state_dict``, and timm's own
``resolve_data_config``/``create_transform`` for the input.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import yaml
from huggingface_hub import constants
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

from xai_audit.flows.cli import main
from xai_audit.tasks.core.config import ModelConfig
from xai_audit.tasks.data.models import default_cam_layer, load_model

NAME = "test_vit.r160_in1k"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def _random_state(num_classes: int | None = None, seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = timm.create_model(NAME, pretrained=False, **({"num_classes": num_classes} if num_classes else {}))
    return {key: value.contiguous() for key, value in model.state_dict().items()}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache of the test's own."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _publish(cache, state) -> None:
    repo = cache / f"models--timm--{NAME}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    (repo / "snapshots" / REVISION).mkdir(parents=True)
    save_file(state, str(repo / "snapshots" / REVISION / "model.safetensors"))


def _timm_reference(state, num_classes=None):
    model = timm.create_model(NAME, pretrained=False, **({"num_classes": num_classes} if num_classes else {}))
    model.load_state_dict(state)
    return model.eval(), create_transform(**resolve_data_config({}, model=model))


def _photo() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (180, 200, 3), dtype=np.uint8))


def test_a_timm_model_loads_offline_from_a_prepared_cache_with_timms_preprocessing_and_class_names(hub_cache):
    state = _random_state()
    _publish(hub_cache, state)

    loaded = load_model(ModelConfig(name="vit", source="timm", arch=NAME))

    reference, transform = _timm_reference(state)
    photo = _photo()
    assert torch.equal(loaded.preprocess(photo), transform(photo))  # bicubic resize to 168, crop 160, mean 0.5
    assert (loaded.input_size, loaded.mean, loaded.std) == (160, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(transform(photo)[None]), reference(transform(photo)[None]))
    assert len(loaded.class_names) == 1000
    assert loaded.class_names[1].startswith("goldfish")  # ImageNet-1k, index 1
    assert default_cam_layer(loaded.module, loaded.input_size) == f"blocks.{len(loaded.module.blocks) - 1}.norm1"


def test_a_timm_model_loads_from_a_local_weights_only_file_with_its_own_head(hub_cache, tmp_path):
    state = _random_state(num_classes=3, seed=2)
    path = tmp_path / "finetuned.pth"
    torch.save(state, path)

    loaded = load_model(
        ModelConfig(name="vit", source="timm", arch=NAME, path=str(path), class_names=["cat", "dog", "owl"])
    )

    reference, transform = _timm_reference(state, num_classes=3)
    image = transform(_photo())[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(image), reference(image))
    assert loaded.class_names == ["cat", "dog", "owl"]


def _run_config(tmp_path, **model) -> str:
    config = tmp_path / "audit.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "device": "cpu",
                "models": [{"name": "vit", "source": "timm", "arch": NAME, **model}],
                "images": {"kind": "folder", "root": str(tmp_path)},
                "dissect": {"enabled": False},
            }
        )
    )
    return str(config)


def test_weights_missing_from_the_cache_exit_2_naming_the_expected_path_before_any_work(hub_cache, tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["run", _run_config(tmp_path), "--results", str(results)]) == 2
    message = capsys.readouterr().err
    assert "models.0.path" in message
    assert f"{hub_cache}/models--timm--{NAME}/snapshots/<revision>/model.safetensors" in message
    assert not results.exists() or not any(results.rglob("*.parquet"))


def test_a_missing_local_file_exits_2_naming_it(hub_cache, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "weights.safetensors"
    assert main(["run", _run_config(tmp_path, path=str(missing)), "--results", str(tmp_path / "results")]) == 2
    message = capsys.readouterr().err
    assert "models.0.path" in message and str(missing) in message


def test_an_unknown_timm_name_is_refused_naming_the_closest_ones(hub_cache):
    from xai_audit.flows.preflight import model_problems

    problems = list(model_problems(0, ModelConfig(name="vit", source="timm", arch="test_vitt.r160_in1k")))
    assert problems[0][0] == "models.0.arch" and "test_vit.r160_in1k" in problems[0][1]
