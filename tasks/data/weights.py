"""Weights files: read without running code, and fetched or found where a model entry points.

Every weights file is read without running code: safetensors, or ``torch.load(weights_only=True)``,
which refuses any pickle that would import something other than tensors and plain containers.
Model sources (:mod:`xai_audit.tasks.data.sources`) share these; none of it knows any source.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors.torch import load_file
from torch import nn

from xai_audit.tasks.core.errors import CheckpointError, ConfigError


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
        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError and OSError
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt): {exc}") from None
    else:
        obj = torch_load_safely(path)
    return _unwrap_state_dict(obj, path)


def torch_load_safely(path: Path, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` of ``path``, its refusals and corruption as :class:`CheckpointError`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - the unpickler reports refusals and corruption in many types
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
            f"{source}: does not match {type(model).__name__}: "
            + "; ".join(problems)
            + " (is the architecture / num_classes right?)"
        )
    model.load_state_dict(state, strict=True)


def _few(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def local_file(value: str, field: str, what: str) -> Path:
    """The existing file ``value`` names (``~`` expanded); :class:`ConfigError` at ``field`` otherwise."""
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(field, f"{what} {path} does not exist")
    return path


def is_url(value: str) -> bool:
    """Whether a config value is an http(s) address rather than a local path."""
    return urlparse(value).scheme in ("http", "https")


def url_filename(url: str) -> str:
    """The file name at the end of ``url``'s path (what a cached download is called)."""
    return os.path.basename(urlparse(url).path)


def download(url: str, dest: Path, field: str, hash_prefix: str | None = None) -> Path:
    """``dest``, downloading ``url`` there first when missing (atomic: temp file, then rename)."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=hash_prefix, progress=True)
    except Exception as exc:  # noqa: BLE001 - URLError, HTTPError, hash mismatch, disk errors
        raise ConfigError(
            field, f"cannot download {url} ({type(exc).__name__}: {exc}); put the file at {dest} or give a local path"
        ) from None
    return dest
