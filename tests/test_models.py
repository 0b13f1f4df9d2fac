"""The model registry: every source loads offline through its real code path."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from xai_audit.tasks.core.config import ConfigErrors, ModelConfig, PreprocessConfig, WorldConfig, load_config
from xai_audit.tasks.core.errors import CheckpointError, ConfigError
from xai_audit.tasks.data.models import default_cam_layer, load_model, resolve_layer, weights_identity
from xai_audit.tasks.data.sources import base, places365


def _random_resnet18(num_classes: int = 1000, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=num_classes)


def _assert_same_weights(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = module.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


@pytest.fixture
def offline(monkeypatch):
    """Any download attempt fails the test: cached files must be used as they are."""
    calls: list[str] = []

    def refuse(url, dst, *args, **kwargs):
        calls.append(url)
        raise URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return calls


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "xai-cache"
    monkeypatch.setenv("XAI_AUDIT_CACHE", str(root))
    return root


# --------------------------------------------------------------------------- torchvision


def test_torchvision_weights_load_from_hub_cache_under_published_name(tmp_path, monkeypatch, offline):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    filename = os.path.basename(weights.url)
    assert filename == "resnet18-f37072fd.pth"  # the published name the hub cache uses
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    state = _random_resnet18(seed=1).state_dict()
    # The file's sha256 does not start with f37072fd: torch.hub only checks the hash prefix
    # while downloading, never for a file already in the cache.
    torch.save(state, checkpoints / filename)

    loaded = load_model(ModelConfig(name="rn", source="torchvision", arch="resnet18", weights="IMAGENET1K_V1"))

    assert offline == []
    _assert_same_weights(loaded.module, state)
    assert not loaded.module.training
    assert loaded.class_names == weights.meta["categories"]
    assert loaded.class_names[0] == "tench" and len(loaded.class_names) == 1000
    assert (loaded.input_size, loaded.mean, loaded.std) == (224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert loaded.preprocess(Image.new("RGB", (300, 260), (10, 20, 30))).shape == (3, 224, 224)
    assert "layer4.1.conv2" in loaded.layer_names and "" not in loaded.layer_names


def test_torchvision_default_alias_resolves_to_the_enum_default(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(_random_resnet18().state_dict(), checkpoints / "resnet18-f37072fd.pth")
    a = load_model(ModelConfig(name="a", source="torchvision", arch="resnet18", weights="DEFAULT"))
    b = load_model(ModelConfig(name="b", source="torchvision", arch="resnet18", weights="IMAGENET1K_V1"))
    assert a.identity == b.identity


def test_torchvision_missing_file_offline_is_a_config_error_naming_the_cache_path(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ConfigError) as info:
        load_model(ModelConfig(name="rn", source="torchvision", arch="resnet18", weights="IMAGENET1K_V1"))
    assert info.value.field == "model.weights"
    assert "resnet18-f37072fd.pth" in str(info.value) and "hub" in str(info.value)
    assert offline == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]


def test_unknown_arch_and_weights_list_the_valid_names():
    with pytest.raises(ConfigError) as arch:
        load_model(ModelConfig(name="m", source="torchvision", arch="resnet19", weights="IMAGENET1K_V1"))
    assert arch.value.field == "model.arch"
    assert "closest: resnet18" in str(arch.value) and "vgg16" in str(arch.value)

    with pytest.raises(ConfigError) as weights:
        load_model(ModelConfig(name="m", source="torchvision", arch="resnet50", weights="IMAGENET1K_V3"))
    assert weights.value.field == "model.weights"
    assert "IMAGENET1K_V1" in str(weights.value) and "IMAGENET1K_V2" in str(weights.value)

    with pytest.raises(ConfigError) as source:
        load_model(ModelConfig.model_construct(name="m", source="onnx"), field="models.2")
    assert source.value.field == "models.2.source" and "places365" in str(source.value)


@pytest.mark.parametrize(
    ("source", "fields", "missing"),
    [
        ("torchvision", {}, "arch, weights"),
        ("torchvision", {"arch": "resnet18"}, "weights"),
        ("places365", {}, "arch"),
        ("checkpoint", {"arch": "resnet18"}, "path"),
        ("python", {}, "callable"),
    ],
)
def test_an_entry_without_a_field_its_source_needs_is_refused_before_loading(source, fields, missing):
    from xai_audit.flows.preflight import model_problems

    entry = ModelConfig(name="m", source=source, **fields)
    assert list(model_problems(3, entry)) == [("models.3", f"source '{source}' needs {missing}")]
    with pytest.raises(ConfigError, match=f"needs {missing}"):
        load_model(entry, field="models.3")


# --------------------------------------------------------------------------- places365


def _places365_checkpoint(path: Path, seed: int = 2) -> dict[str, torch.Tensor]:
    """A file in the CSAIL format: legacy (pre-zip) serialisation, ``module.`` keys, metadata."""
    state = _random_resnet18(num_classes=365, seed=seed).state_dict()
    checkpoint = {
        "epoch": 90,
        "arch": "resnet18",
        "state_dict": OrderedDict((f"module.{k}", v) for k, v in state.items()),
        "best_prec1": 54.74,
    }
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False, pickle_protocol=2)
    return state


def _places365_categories(path: Path) -> list[str]:
    names = ["airfield", "apartment_building/outdoor"] + [f"scene{i}" for i in range(2, 365)]
    lines = [f"/{n[0]}/{n} {i}" for i, n in enumerate(names)]
    lines[0], lines[1] = lines[1], lines[0]  # index order, not line order, decides
    path.write_text("\n".join(lines) + "\n")
    return names


def test_places365_uses_checkpoint_and_categories_already_in_the_cache(cache, offline):
    folder = cache / "places365"
    folder.mkdir(parents=True)
    state = _places365_checkpoint(folder / "resnet18_places365.pth.tar")
    names = _places365_categories(folder / "categories_places365.txt")

    loaded = load_model(ModelConfig(name="places", source="places365", arch="resnet18"))

    assert offline == []
    _assert_same_weights(loaded.module, state)
    assert loaded.class_names == names and loaded.class_names[1] == "apartment_building/outdoor"
    assert loaded.module.fc.out_features == 365
    assert loaded.preprocess(Image.new("RGB", (400, 300))).shape == (3, 224, 224)


def test_places365_accepts_local_checkpoint_with_categories_beside_it(tmp_path, cache, offline):
    state = _places365_checkpoint(tmp_path / "my_places.pth.tar", seed=3)
    names = _places365_categories(tmp_path / "categories_places365.txt")
    loaded = load_model(
        ModelConfig(name="p", source="places365", arch="resnet18", weights=str(tmp_path / "my_places.pth.tar"))
    )
    _assert_same_weights(loaded.module, state)
    assert loaded.class_names == names
    assert offline == []


def test_places365_new_zip_format_and_explicit_categories_path(tmp_path, cache, offline):
    state = _random_resnet18(num_classes=365, seed=4).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth.tar")
    names = _places365_categories(tmp_path / "cats.txt")
    loaded = load_model(
        ModelConfig(
            name="p",
            source="places365",
            arch="resnet18",
            weights=str(tmp_path / "w.pth.tar"),
            categories=str(tmp_path / "cats.txt"),
        )
    )
    _assert_same_weights(loaded.module, state)
    assert loaded.class_names == names


def test_places365_missing_cache_offline_names_where_to_put_the_file(cache, offline):
    with pytest.raises(ConfigError) as info:
        load_model(ModelConfig(name="p", source="places365", arch="resnet18"))
    assert str(cache / "places365" / "resnet18_places365.pth.tar") in str(info.value)
    assert offline == ["http://places2.csail.mit.edu/models_places365/resnet18_places365.pth.tar"]


def test_places365_categories_must_index_every_class_once(tmp_path):
    bad = tmp_path / "cats.txt"
    bad.write_text("/a/airfield 0\n/b/bar 0\n")
    with pytest.raises(ConfigError, match="indices"):
        places365.read_categories(bad)
    with pytest.raises(ConfigError):
        load_model(ModelConfig(name="p", source="places365", arch="vgg16"))


# --------------------------------------------------------------------------- checkpoint


def test_checkpoint_safetensors_with_class_names_and_preprocess(tmp_path):
    model = _random_resnet18(num_classes=3, seed=5)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "m.safetensors"))
    (tmp_path / "classes.txt").write_text("cat\n\ndog\nbird\n")
    loaded = load_model(
        ModelConfig(
            name="ckpt",
            source="checkpoint",
            arch="resnet18",
            path=str(tmp_path / "m.safetensors"),
            class_names=str(tmp_path / "classes.txt"),
            preprocess=PreprocessConfig(resize=80, crop=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        )
    )
    _assert_same_weights(loaded.module, state)
    assert loaded.class_names == ["cat", "dog", "bird"]
    assert loaded.input_size == 64
    x = loaded.preprocess(Image.new("RGB", (160, 100), (255, 0, 128)))
    assert x.shape == (3, 64, 64)
    # (255/255 - 0.5) / 0.25 = 2, (0 - 0.5) / 0.25 = -2
    assert torch.allclose(x[:, 10, 10], torch.tensor([2.0, -2.0, (128 / 255 - 0.5) / 0.25]), atol=1e-5)


def test_checkpoint_pt_wrapped_in_model_key_with_dataparallel_prefix(tmp_path):
    state = _random_resnet18(num_classes=4, seed=6).state_dict()
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "m.pt")
    loaded = load_model(
        ModelConfig(name="c", source="checkpoint", arch="resnet18", path=str(tmp_path / "m.pt"), num_classes=4)
    )
    _assert_same_weights(loaded.module, state)
    assert loaded.class_names == ["class_0", "class_1", "class_2", "class_3"]


def test_checkpoint_with_wrong_num_classes_names_the_shape_mismatch(tmp_path):
    torch.save(_random_resnet18(num_classes=4).state_dict(), tmp_path / "m.pth")
    with pytest.raises(CheckpointError) as info:
        load_model(
            ModelConfig(name="c", source="checkpoint", arch="resnet18", path=str(tmp_path / "m.pth"), num_classes=5)
        )
    assert "fc.weight (file [4, 512], model [5, 512])" in str(info.value)


def test_checkpoint_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_model(ModelConfig(name="c", source="checkpoint", arch="resnet18", path=str(tmp_path / "nope.pt")))
    assert info.value.field == "model.path"


# --------------------------------------------------------------------------- python


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg_xai"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        textwrap.dedent("""
        from torch import nn

        def tiny():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).train()

        def not_a_model():
            return "hello"
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "userpkg_xai.nets"
    for name in [m for m in sys.modules if m.startswith("userpkg_xai")]:
        del sys.modules[name]


def test_python_callable_with_class_names_and_preprocess(user_package):
    loaded = load_model(
        ModelConfig(
            name="py",
            source="python",
            callable=f"{user_package}:tiny",
            class_names=["a", "b", "c"],
            preprocess=PreprocessConfig(resize=40, crop=32),
        )
    )
    assert not loaded.module.training
    assert loaded.class_names == ["a", "b", "c"]
    assert loaded.preprocess(Image.new("RGB", (50, 70))).shape == (3, 32, 32)
    assert loaded.layer_names == ["0", "1", "2", "3", "4", "5"]
    assert default_cam_layer(loaded.module, 32) == "2"


def test_python_callable_errors_name_the_field(user_package, tmp_path):
    cases = [
        (ModelConfig(name="p", source="python", callable=f"{user_package}:tiny"), "model.class_names"),
        (ModelConfig(name="p", source="python", callable=f"{user_package}:tiny", num_classes=5), "model.class_names"),
        (
            ModelConfig(name="p", source="python", callable=f"{user_package}:not_a_model", num_classes=3),
            "model.callable",
        ),
        (ModelConfig(name="p", source="python", callable=f"{user_package}:missing", num_classes=3), "model.callable"),
        (ModelConfig(name="p", source="python", callable="tiny", num_classes=3), "model.callable"),
        (
            ModelConfig(
                name="p",
                source="python",
                callable=f"{user_package}:tiny",
                num_classes=3,
                preprocess=PreprocessConfig(resize=2, crop=2),
            ),
            "model.preprocess",
        ),  # 2 px < two 3x3 convs
    ]
    for spec, field in cases:
        with pytest.raises(ConfigError) as info:
            load_model(spec)
        assert info.value.field == field, spec
    tiny = ModelConfig(name="p", source="python", callable=f"{user_package}:tiny", num_classes=3)
    assert load_model(tiny).class_names == ["class_0", "class_1", "class_2"]


def test_python_callable_string_is_imported_never_evaluated(tmp_path):
    marker = tmp_path / "evaluated"
    spec = ModelConfig(
        name="p", source="python", num_classes=3, callable=f"__import__('os').system('touch {marker}'):f"
    )
    with pytest.raises(ConfigError):
        load_model(spec)
    assert not marker.exists()


def _model_file(folder: Path, width: int) -> None:
    """``folder/model.py`` whose ``build`` returns a net with ``width`` outputs (how two files are told apart)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(
        textwrap.dedent(f"""
        from torch import nn

        def build():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, {width}))
    """)
    )


def _python_config(folder: Path, callable_: str, num_classes: int) -> Path:
    path = folder / "audit.yaml"
    model = {"name": "mine", "source": "python", "callable": callable_, "num_classes": num_classes}
    path.write_text(json.dumps({"models": [model], "dissect": {"enabled": False}}))
    return path


def test_a_callable_file_beside_the_config_loads_without_pythonpath_and_never_shadows_another(tmp_path, monkeypatch):
    """Two configs in two folders each name ``model.py:build``; each gets its own file's model,
    whatever the current directory, and nothing named ``model`` is left importable."""
    monkeypatch.chdir(tmp_path)
    loaded = {}
    for name, width in (("first", 3), ("second", 5)):
        _model_file(tmp_path / name, width)
        config = load_config(_python_config(tmp_path / name, "model.py:build", width))
        assert config.models[0].callable == f"{tmp_path / name / 'model.py'}:build"
        loaded[name] = load_model(config.models[0])
    assert [model.class_names for model in loaded.values()] == [
        [f"class_{index}" for index in range(3)],
        [f"class_{index}" for index in range(5)],
    ]
    assert "model" not in sys.modules


def test_a_callable_file_missing_or_outside_the_config_folder_is_refused_with_its_field(tmp_path, monkeypatch):
    elsewhere, project = tmp_path / "elsewhere", tmp_path / "project"
    _model_file(elsewhere, 3)
    project.mkdir()
    monkeypatch.chdir(project)
    for target, expected in (
        ("missing.py:build", "file not found"),
        ("../elsewhere/model.py:build", "outside the config's folder"),
        (f"{elsewhere / 'model.py'}:build", "outside the config's folder"),
    ):
        with pytest.raises(ConfigErrors) as info:
            load_config(_python_config(project, target, 3))
        ((field, message),) = info.value.problems
        assert field == "models.0.callable" and expected in message, (target, message)
    (project / "link.py").symlink_to(elsewhere / "model.py")  # a symlink does not carry the file inside
    with pytest.raises(ConfigErrors, match="outside the config's folder"):
        load_config(_python_config(project, "link.py:build", 3))


def test_a_callable_file_that_raises_on_import_names_the_field(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('no GPU driver')\n")
    config = load_config(_python_config(tmp_path, "broken.py:build", 3))
    with pytest.raises(ConfigError) as info:
        load_model(config.models[0])
    assert info.value.field == "model.callable" and "RuntimeError: no GPU driver" in info.value.message


# --------------------------------------------------------------------------- demo


def test_demo_source_builds_preprocessing_from_meta(tmp_path, monkeypatch):
    from xai_audit.tasks.world import demo_model

    folder = tmp_path / "demo"
    folder.mkdir()
    state = {k: v.contiguous() for k, v in _random_resnet18(num_classes=4, seed=7).state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    meta = {
        "arch": "resnet18",
        "class_names": ["circle", "square", "triangle", "star"],
        "image_size": 64,
        "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.2, 0.2],
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    worlds = []
    monkeypatch.setattr(demo_model, "ensure_demo_model", lambda world, *a, **k: worlds.append(world) or folder)

    loaded = load_model(ModelConfig(name="demo", source="demo"), world=WorldConfig(seed=3))

    assert worlds == [WorldConfig(seed=3)]  # the model trained on the run's world

    _assert_same_weights(loaded.module, state)
    assert loaded.class_names == meta["class_names"]
    assert (loaded.input_size, loaded.mean, loaded.std) == (64, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    x = loaded.preprocess(Image.new("RGB", (128, 96), (255, 255, 255)))
    assert x.shape == (3, 64, 64)
    assert torch.allclose(x[:, 0, 0], torch.tensor([2.5, 3.0, 3.5]), atol=1e-5)
    explicit = load_model(ModelConfig(name="demo", source="demo", path=str(folder)))
    assert explicit.identity == loaded.identity


# --------------------------------------------------------------------------- layers and identity


def test_resolve_layer_finds_nested_names_and_lists_close_ones_for_typos():
    model = _random_resnet18()
    assert resolve_layer(model, "layer4.1.conv2") is model.layer4[1].conv2
    with pytest.raises(ConfigError) as info:
        resolve_layer(model, "layer4.1.conv3", field="models.0.layers.1")
    assert info.value.field == "models.0.layers.1"
    message = str(info.value)
    assert "closest: layer4.1.conv2" in message and "conv1, bn1, relu, maxpool, layer1" in message


def test_default_cam_layer_is_the_last_spatial_stage_or_last_blocks_first_norm_and_refuses_models_with_neither():
    assert default_cam_layer(_random_resnet18(), input_size=96) == "layer4"
    # SqueezeNet's classifier holds a conv too, but its output is pooled to 1x1
    assert default_cam_layer(torchvision.models.squeezenet1_1(), input_size=96) == "features"
    vgg_like = nn.Sequential(
        OrderedDict(
            features=nn.Conv2d(3, 4, 3, stride=4),
            avgpool=nn.AdaptiveAvgPool2d(7),
            flatten=nn.Flatten(),
            classifier=nn.Linear(4 * 49, 2),
        )
    )
    assert default_cam_layer(vgg_like, input_size=64) == "features"  # VGG's 7x7 avgpool is no CAM layer
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8
    )
    assert default_cam_layer(vit, input_size=32) == "encoder.layers.encoder_layer_0.ln_1"  # grad-cam's advice
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2))
    with pytest.raises(ConfigError, match="name one in the config"):
        default_cam_layer(mlp, input_size=32)


def test_weights_identity_changes_with_any_weight_and_identity_is_stable(tmp_path):
    a, b = _random_resnet18(seed=8), _random_resnet18(seed=8)
    assert weights_identity(a) == weights_identity(b)
    with torch.no_grad():
        b.layer3[0].conv1.weight[0, 0, 0, 0] += 1e-3
    assert weights_identity(a) != weights_identity(b)

    for model, name in ((a, "a.safetensors"), (b, "b.safetensors")):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / name))
    spec = ModelConfig(name="x", source="checkpoint", arch="resnet18", path=str(tmp_path / "a.safetensors"))
    first, again = load_model(spec), load_model(spec.model_copy(update={"name": "renamed"}))
    other = load_model(spec.model_copy(update={"path": str(tmp_path / "b.safetensors")}))
    assert first.identity == again.identity  # the user's label is not part of the identity
    assert first.identity != other.identity
    resized = load_model(spec.model_copy(update={"preprocess": PreprocessConfig(resize=128, crop=112)}))
    assert resized.identity != first.identity


def test_module_level_constants_match_the_published_files():
    assert places365.URL.format(arch="resnet18").endswith("/models_places365/resnet18_places365.pth.tar")
    assert np.allclose(base.IMAGENET_MEAN, (0.485, 0.456, 0.406))
