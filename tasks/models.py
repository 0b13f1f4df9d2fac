"""Model registry: turn a model entry of the config into an eval-mode module and its metadata.

Sources (``spec.source``):

- ``torchvision``: ``arch`` + ``weights`` (a member of the arch's weights enum, e.g.
  ``IMAGENET1K_V1``, or ``DEFAULT``). The file is downloaded into the torch hub cache
  (``$TORCH_HOME/hub/checkpoints``) on first use, hash-checked, and works offline afterwards.
  Preprocessing and class names come from the weights' metadata.
- ``places365``: the CSAIL ResNet18/ResNet50 checkpoints (``<arch>_places365.pth.tar``) from the
  cache (``<cache>/places365``, downloaded when missing) or a local path / URL in ``weights``;
  class names from ``categories_places365.txt`` (``categories``, or beside the checkpoint, or
  downloaded into the cache).
- ``checkpoint``: a torchvision ``arch`` (with ``num_classes``) + a local state dict ``path``
  (``.safetensors``, or a torch pickle loaded with ``weights_only=True``).
- ``python``: ``callable = "package.module:function"`` returning an ``nn.Module``; preprocessing
  and class names from the spec.
- ``demo``: the synthetic world's trained ResNet18 (:mod:`tasks.demo_model`): the model
  directory in ``path`` when given, else the default world's model (trained on first use).

Every weights file is read without running code: safetensors, or ``torch.load(weights_only=True)``,
which refuses any pickle that would import something other than tensors and plain containers.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import os
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms as T

from tasks.cache import cache_root
from tasks.errors import CheckpointError, ConfigError

SOURCES = ("torchvision", "places365", "checkpoint", "python", "demo")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PLACES365_ARCHS = ("resnet18", "resnet50")
PLACES365_URL = "http://places2.csail.mit.edu/models_places365/{arch}_places365.pth.tar"
PLACES365_CATEGORIES_URL = (
    "https://raw.githubusercontent.com/csailvision/places365/master/categories_places365.txt"
)


@dataclass(frozen=True)
class PreprocessSpec:
    """Resize the shorter side to ``resize``, center-crop ``crop``, normalise with mean/std."""

    resize: int = 256
    crop: int = 224
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD


@dataclass(frozen=True)
class ModelSpec:
    """A model entry, for callers without the pydantic config (same attribute names)."""

    name: str
    source: str
    arch: str | None = None
    weights: str | None = None
    path: str | None = None
    categories: str | None = None
    callable: str | None = None
    class_names: list[str] | str | None = None
    preprocess: PreprocessSpec | None = None
    num_classes: int | None = None


@dataclass
class LoadedModel:
    """An eval-mode model with everything the stages need to feed it and name its outputs."""

    name: str
    module: nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    class_names: list[str]
    layer_names: list[str]
    identity: str
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @cached_property
    def pixel_model(self) -> PixelModel:
        """The model on [0, 1] pixels (what LIME perturbs), built once so its inference copy is too."""
        return PixelModel(self.module, self.mean, self.std)


class PixelModel(nn.Module):
    """A classifier on [0, 1] pixels: its input normalisation in front, in eval mode."""

    def __init__(self, module: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.module = module
        parameter = next(module.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        self.register_buffer("mean", torch.tensor(mean, device=device, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, device=device, dtype=torch.float32).view(1, -1, 1, 1))
        self.train(module.training)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module(self.normalise(pixels))


def load_model(spec: Any, field: str = "model") -> LoadedModel:
    """Load the model a config entry describes; ``field`` prefixes error field paths.

    Raises :class:`ConfigError` for unknown sources, architectures, weights, missing files or
    bad class names, and :class:`CheckpointError` for unsafe, truncated or mismatching weights.
    """
    loaders = {
        "torchvision": _load_torchvision,
        "places365": _load_places365,
        "checkpoint": _load_checkpoint,
        "python": _load_python,
        "demo": _load_demo,
    }
    if spec.source not in loaders:
        raise ConfigError(f"{field}.source", f"unknown source {spec.source!r}; valid: {', '.join(SOURCES)}")
    module, preprocess, class_names, input_size, mean, std, origin = loaders[spec.source](spec, field)
    module.eval()
    identity = _content_hash(
        {
            "origin": origin,
            "class": type(module).__qualname__,
            "weights": weights_identity(module),
            "input_size": input_size,
            "mean": list(mean),
            "std": list(std),
            "class_names": class_names,
        }
    )
    return LoadedModel(
        name=spec.name,
        module=module,
        preprocess=preprocess,
        class_names=class_names,
        layer_names=[n for n, _ in module.named_modules() if n],
        identity=identity,
        input_size=input_size,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )


# --------------------------------------------------------------------------- layers


def resolve_layer(module: nn.Module, name: str, field: str = "layer") -> nn.Module:
    """The submodule called ``name`` in ``named_modules()`` (``layer4``, ``layer4.1.conv2``).

    An unknown name raises :class:`ConfigError` listing the closest valid names first, then
    the top-level ones.
    """
    try:
        return module.get_submodule(name)
    except AttributeError:
        valid = [n for n, _ in module.named_modules() if n]
        close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
        top = [n for n, _ in module.named_children()]
        hint = f"closest: {', '.join(close)}; " if close else ""
        raise ConfigError(
            field,
            f"unknown layer {name!r}; {hint}top-level layers: {', '.join(top)} "
            f"({len(valid)} layers in all, named as in named_modules(), e.g. {valid[-1] if valid else ''})",
        ) from None


_POOLING = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
            nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)


def default_cam_layer(module: nn.Module, input_size: int = 224, field: str = "layer") -> str:
    """The layer CAMs use when the config names none: the last feature map before pooling.

    Rule: run one zero image of ``input_size`` through the model and take the top-level child
    that ran last among those returning a 4-D ``[N, C, H, W]`` output with H, W > 1, pooling
    layers aside — ``layer4`` for ResNets, ``features`` for VGG/DenseNet/MobileNet/EfficientNet/
    ConvNeXt/SqueezeNet, ``trunk_output`` for RegNet, ``inception5b``/``Mixed_7c`` for
    GoogLeNet/Inception-v3, ``permute`` (the NCHW map after the last norm) for Swin. Transformers (a later child returns token sequences) have no
    such map: their CAM layer must be given in the config.
    """
    calls: list[tuple[str, tuple[int, ...] | None]] = []
    hooks = []
    for name, child in module.named_children():
        if isinstance(child, _POOLING):
            continue

        def record(_m: nn.Module, _inp: Any, out: Any, name: str = name) -> None:
            calls.append((name, tuple(out.shape) if isinstance(out, torch.Tensor) else None))

        hooks.append(child.register_forward_hook(record))
    was_training = module.training
    try:
        module.eval()
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            module(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        module.train(was_training)
    spatial = [i for i, (_, shape) in enumerate(calls) if shape is not None and len(shape) == 4 and min(shape[2:]) > 1]
    if not spatial or any(shape is not None and len(shape) == 3 for _, shape in calls[spatial[-1] + 1 :]):
        raise ConfigError(
            field,
            f"{type(module).__name__} has no convolutional feature map to use as the default CAM "
            "layer; name one in the config (a layer from named_modules())",
        )
    return calls[spatial[-1]][0]


def weights_identity(module: nn.Module) -> str:
    """A SHA-256 of the module's state dict (names, dtypes, shapes and bytes, sorted by name)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _content_hash(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- weights files


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, read without executing code.

    ``.safetensors`` through safetensors; anything else through ``torch.load(weights_only=True)``.
    A checkpoint dict holding ``state_dict`` or ``model`` is unwrapped, and a ``module.`` prefix
    (DataParallel) on every key is stripped. Raises :class:`CheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError and OSError
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt): {exc}") from None
    else:
        obj = _torch_load_safely(path)
    return _unwrap_state_dict(obj, path)


def _torch_load_safely(path: Path, mmap: bool = False) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # the unpickler reports refusals and corruption in many types
        text = str(exc)
        refused = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"Unsupported operand ([^\s.]+)", text)
        if refused:
            raise CheckpointError(
                f"{path}: refused: its pickle would load {refused.group(1)}, which is not a tensor or "
                "plain container; only state dicts are accepted (save model.state_dict(), or "
                "convert to .safetensors)"
            ) from None
        reason = text.split(". ")[0] if text else ""
        raise CheckpointError(
            f"{path}: cannot read as a PyTorch weights file, truncated or corrupt ({type(exc).__name__}: {reason})"
        ) from None


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: entries that are not tensors: {_few(not_tensors)}")
    state = {str(k): v for k, v in obj.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_state_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model``, or raise :class:`CheckpointError` naming every mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} (file {list(state[k].shape)}, model {list(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_few(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatches: {_few(wrong_shape)}")
    if problems:
        raise CheckpointError(
            f"{source}: does not match {type(model).__name__}: " + "; ".join(problems)
            + " (is the architecture / num_classes right?)"
        )
    model.load_state_dict(state, strict=True)


def _few(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# --------------------------------------------------------------------------- shared helpers


Loaded = tuple[nn.Module, Callable[[Image.Image], torch.Tensor], list[str], int, Sequence[float], Sequence[float], dict]


def _classification_archs() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _check_arch(arch: str | None, field: str, allowed: Sequence[str] | None = None) -> str:
    valid = list(allowed) if allowed is not None else _classification_archs()
    if arch not in valid:
        close = difflib.get_close_matches(str(arch), valid, n=3)
        first = f"closest: {', '.join(close)}; " if close else ""
        raise ConfigError(f"{field}.arch", f"unknown architecture {arch!r}; {first}valid: {', '.join(valid)}")
    return arch


def _standard_preprocess(resize: int, crop: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    return T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), T.Normalize(list(mean), list(std))])


def _spec_preprocess(spec: Any, field: str) -> tuple[T.Compose, int, Sequence[float], Sequence[float]]:
    pre = spec.preprocess if spec.preprocess is not None else PreprocessSpec()
    if pre.resize <= 0 or pre.crop <= 0 or pre.crop > pre.resize:
        raise ConfigError(f"{field}.preprocess", f"need 0 < crop <= resize, got resize={pre.resize}, crop={pre.crop}")
    if len(pre.mean) != 3 or len(pre.std) != 3 or any(s <= 0 for s in pre.std):
        raise ConfigError(f"{field}.preprocess", "mean and std need three values each, std > 0")
    return _standard_preprocess(pre.resize, pre.crop, pre.mean, pre.std), pre.crop, pre.mean, pre.std


def _spec_class_names(spec: Any, field: str, required: bool) -> list[str] | None:
    names = spec.class_names
    if isinstance(names, (str, os.PathLike)):
        path = Path(names).expanduser()
        if not path.is_file():
            raise ConfigError(f"{field}.class_names", f"{path} is not a file (expected one class name per line)")
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{field}.class_names", f"{path} is not UTF-8 text: {exc.reason}") from None
    if names is not None:
        names = [str(n) for n in names]
        if spec.num_classes is not None and len(names) != spec.num_classes:
            raise ConfigError(f"{field}.class_names", f"{len(names)} class names but num_classes is {spec.num_classes}")
        if not names:
            raise ConfigError(f"{field}.class_names", "empty list of class names")
        return names
    if spec.num_classes is not None:
        if spec.num_classes <= 0:
            raise ConfigError(f"{field}.num_classes", f"must be positive, got {spec.num_classes}")
        return [f"class_{i}" for i in range(spec.num_classes)]
    if required:
        raise ConfigError(f"{field}.class_names", "give class_names (a list or a file) or num_classes")
    return None


def _local_path(value: str, field: str, what: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(field, f"{what} {path} does not exist")
    return path


def _is_url(value: str) -> bool:
    return urlparse(value).scheme in ("http", "https")


def _download(url: str, dest: Path, field: str, hash_prefix: str | None = None) -> Path:
    """``dest``, downloading ``url`` there first when missing (atomic: temp file, then rename)."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=hash_prefix, progress=True)
    except Exception as exc:  # URLError, HTTPError, hash mismatch, disk errors
        raise ConfigError(
            field, f"cannot download {url} ({type(exc).__name__}: {exc}); put the file at {dest} or give a local path"
        ) from None
    return dest


# --------------------------------------------------------------------------- sources


def _load_torchvision(spec: Any, field: str) -> Loaded:
    arch = _check_arch(spec.arch, field)
    enum = torchvision.models.get_model_weights(arch)
    valid = [w.name for w in enum] + ["DEFAULT"]
    if spec.weights not in valid:
        raise ConfigError(f"{field}.weights", f"unknown weights {spec.weights!r} for {arch}; valid: {', '.join(valid)}")
    weights = enum[spec.weights]
    # torchvision loads hub files with weights_only=False; fetch and vet the file first so
    # that call only ever unpickles a file that passed the weights_only check.
    filename = os.path.basename(urlparse(weights.url).path)
    match = torch.hub.HASH_REGEX.search(filename)
    cached = _download(
        weights.url,
        Path(torch.hub.get_dir()) / "checkpoints" / filename,
        f"{field}.weights",
        hash_prefix=match.group(1) if match else None,
    )
    _torch_load_safely(cached, mmap=zipfile.is_zipfile(cached))  # legacy files cannot be mapped
    try:
        module = torchvision.models.get_model(arch, weights=weights)
    except Exception as exc:  # a vetted file that still does not fit the architecture
        raise CheckpointError(f"{cached}: cannot load into {arch} ({type(exc).__name__}: {exc})") from None
    preprocess = weights.transforms()
    crop = int(preprocess.crop_size[0])
    origin = {"source": "torchvision", "arch": arch, "weights": weights.name, "url": weights.url}
    return module, preprocess, list(weights.meta["categories"]), crop, preprocess.mean, preprocess.std, origin


def _load_places365(spec: Any, field: str) -> Loaded:
    arch = _check_arch(spec.arch or "resnet18", field, allowed=PLACES365_ARCHS)
    cache = cache_root() / "places365"
    source = spec.weights or PLACES365_URL.format(arch=arch)
    if _is_url(source):
        checkpoint = _download(source, cache / os.path.basename(urlparse(source).path), f"{field}.weights")
    else:
        checkpoint = _local_path(source, f"{field}.weights", "Places365 checkpoint")
    state = read_state_dict(checkpoint)

    if spec.categories:
        if _is_url(spec.categories):
            cat_file = _download(spec.categories, cache / os.path.basename(urlparse(spec.categories).path), f"{field}.categories")
        else:
            cat_file = _local_path(spec.categories, f"{field}.categories", "categories file")
    elif (checkpoint.parent / "categories_places365.txt").is_file():
        cat_file = checkpoint.parent / "categories_places365.txt"
    else:
        cat_file = _download(PLACES365_CATEGORIES_URL, cache / "categories_places365.txt", f"{field}.categories")
    class_names = read_places365_categories(cat_file, f"{field}.categories")

    module = torchvision.models.get_model(arch, weights=None, num_classes=len(class_names))
    load_state_into(module, state, str(checkpoint))
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    origin = {"source": "places365", "arch": arch}
    return module, _standard_preprocess(256, 224, mean, std), class_names, 224, mean, std, origin


def read_places365_categories(path: Path, field: str = "categories") -> list[str]:
    """Class names from ``categories_places365.txt``: ``/a/airfield 0`` -> ``airfield``.

    Names keep their sub-category as the official demo does (``/a/apartment_building/outdoor``
    -> ``apartment_building/outdoor``); lines are ordered by their index, which must run
    0..N-1.
    """
    try:
        lines = [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise ConfigError(field, f"{path} is not UTF-8 text: {exc.reason}") from None
    by_index: dict[int, str] = {}
    for number, parts in enumerate(lines, start=1):
        if len(parts) != 2 or not parts[1].isdigit():
            raise ConfigError(field, f"{path}:{number}: expected '/x/name INDEX', got {' '.join(parts)!r}")
        by_index[int(parts[1])] = re.sub(r"^/[^/]/", "", parts[0])
    if sorted(by_index) != list(range(len(lines))):
        raise ConfigError(field, f"{path}: indices must be 0..{len(lines) - 1}, each once")
    return [by_index[i] for i in range(len(lines))]


def _load_checkpoint(spec: Any, field: str) -> Loaded:
    arch = _check_arch(spec.arch, field)
    if not spec.path:
        raise ConfigError(f"{field}.path", "source 'checkpoint' needs a path to a state dict")
    path = _local_path(spec.path, f"{field}.path", "checkpoint")
    class_names = _spec_class_names(spec, field, required=False)
    num_classes = spec.num_classes or (len(class_names) if class_names else 1000)
    class_names = class_names or [f"class_{i}" for i in range(num_classes)]
    state = read_state_dict(path)
    module = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    load_state_into(module, state, str(path))
    preprocess, size, mean, std = _spec_preprocess(spec, field)
    origin = {"source": "checkpoint", "arch": arch}
    return module, preprocess, class_names, size, mean, std, origin


def _load_python(spec: Any, field: str) -> Loaded:
    target = spec.callable or ""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{field}.callable", f"expected 'package.module:function', got {target!r}")
    try:
        factory: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{field}.callable", f"cannot import {target!r}: {exc}") from None
    if not callable(factory):
        raise ConfigError(f"{field}.callable", f"{target!r} is a {type(factory).__name__}, not callable")
    try:
        module = factory()
    except Exception as exc:  # the user's factory failing is a problem with this model entry
        raise ConfigError(f"{field}.callable", f"calling {target!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{field}.callable", f"{target!r} returned a {type(module).__name__}, not a torch.nn.Module")
    class_names = _spec_class_names(spec, field, required=True)
    preprocess, size, mean, std = _spec_preprocess(spec, field)
    module.eval()
    param = next(module.parameters(), None)
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, 3, size, size, device=param.device if param is not None else "cpu"))
    except Exception as exc:  # the model cannot take the configured input size
        raise ConfigError(
            f"{field}.preprocess", f"{target!r} fails on a [1, 3, {size}, {size}] input ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != len(class_names):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"{field}.class_names",
            f"{target!r} outputs {shape} for one {size}x{size} image, expected [1, {len(class_names)}] logits",
        )
    origin = {"source": "python", "callable": target}
    return module, preprocess, class_names, size, mean, std, origin


def _load_demo(spec: Any, field: str) -> Loaded:
    from tasks.demo_model import ensure_demo_model, load_demo_model  # trains on first use

    module, meta = load_demo_model(Path(spec.path) if spec.path else ensure_demo_model())
    size = int(meta["image_size"])
    mean, std = tuple(meta["mean"]), tuple(meta["std"])
    preprocess = _standard_preprocess(size, size, mean, std)
    origin = {"source": "demo", "arch": meta.get("arch", "resnet18")}
    return module, preprocess, list(meta["class_names"]), size, mean, std, origin
