"""Hostile and broken weights files: refused with a clear error, never executed."""

from __future__ import annotations

import os
import pickle
import re
import shlex
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from xai_audit.tasks.core.config import ModelConfig
from xai_audit.tasks.core.errors import CheckpointError
from xai_audit.tasks.data.models import load_model
from xai_audit.tasks.data.weights import read_state_dict


class _SystemPayload:
    """Unpickling this runs ``os.system("touch MARKER")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _armed_torch_file(path: Path, marker: Path) -> None:
    """A torch.save checkpoint whose state dict hides the payload among real tensors."""
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1), "evil": _SystemPayload(marker)}}, path)


def test_payload_is_live_when_loaded_unsafely(tmp_path):
    # Guards the tests below: the payload really runs under a plain unpickler, so its
    # absence there means the loader refused it, not that the payload was inert.
    marker = tmp_path / "ran-unsafely"
    _armed_torch_file(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_checkpoint_with_os_system_payload_is_refused_and_never_runs(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    _armed_torch_file(path, marker)
    with pytest.raises(CheckpointError) as info:
        load_model(ModelConfig(name="evil", source="checkpoint", arch="resnet18", path=str(path)))
    assert not marker.exists()
    message = str(info.value)
    assert str(path) in message and "refused" in message and "system" in message


def test_raw_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "raw.pth"
    path.write_bytes(pickle.dumps({"w": _SystemPayload(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(path)
    assert not marker.exists()


def test_payload_in_torch_hub_cache_is_refused_before_torchvision_unpickles_it(tmp_path, monkeypatch):
    # torchvision itself loads hub files with weights_only=False: the registry must vet them.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(URLError("offline")))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    marker = tmp_path / "pwned"
    _armed_torch_file(checkpoints / "resnet18-f37072fd.pth", marker)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(ModelConfig(name="rn", source="torchvision", arch="resnet18", weights="IMAGENET1K_V1"))
    assert not marker.exists()


def test_payload_in_places365_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("XAI_AUDIT_CACHE", str(tmp_path / "cache"))
    marker = tmp_path / "pwned"
    path = tmp_path / "resnet18_places365.pth.tar"
    torch.save(
        {"epoch": 1, "state_dict": {"module.x": _SystemPayload(marker)}}, path, _use_new_zipfile_serialization=False
    )
    (tmp_path / "categories_places365.txt").write_text("/a/airfield 0\n")
    with pytest.raises(CheckpointError, match="refused"):
        load_model(ModelConfig(name="p", source="places365", arch="resnet18", weights=str(path)))
    assert not marker.exists()


def test_pickled_whole_module_is_refused_with_a_hint_to_save_the_state_dict(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pt")
    with pytest.raises(CheckpointError) as info:
        read_state_dict(tmp_path / "whole.pt")
    assert "torch.nn.modules.linear.Linear" in str(info.value) and "state_dict()" in str(info.value)


def test_wrong_architecture_names_unexpected_keys_with_counts(tmp_path):
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(CheckpointError) as info:
        load_model(
            ModelConfig(name="c", source="checkpoint", arch="resnet18", path=str(tmp_path / "r34.pth"), num_classes=10)
        )
    message = str(info.value)
    # resnet34 has 3/4/6/3 blocks per stage where resnet18 has 2/2/2/2
    assert "r34.pth: does not match ResNet" in message
    assert "unexpected keys: layer1.2.conv1.weight, layer1.2.bn1.weight" in message
    assert "missing keys" not in message
    assert re.search(r"\d+ unexpected keys: .*\(\d+ more\)", message)  # long lists are cut, with a count


def test_missing_keys_are_named(tmp_path):
    state = torchvision.models.resnet18(num_classes=2).state_dict()
    del state["layer2.0.bn1.running_var"], state["fc.bias"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"2 missing keys: layer2\.0\.bn1\.running_var, fc\.bias"):
        load_model(
            ModelConfig(
                name="c", source="checkpoint", arch="resnet18", path=str(tmp_path / "partial.pt"), num_classes=2
            )
        )


@pytest.mark.parametrize("keep", [0.5, 0.999, 10])
def test_truncated_safetensors_is_a_clear_error(tmp_path, keep):
    state = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(10, 10)}
    full = tmp_path / "full.safetensors"
    save_file(state, str(full))
    data = full.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:keep])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dict(cut)
    assert set(read_state_dict(full)) == {"a", "b"}


def test_truncated_torch_file_and_non_dict_payloads_are_clear_errors(tmp_path):
    torch.save({"w": torch.ones(100)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        read_state_dict(tmp_path / "cut.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_state_dict(tmp_path / "list.pt")
    torch.save({"w": torch.ones(1), "epoch": 3}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="not tensors: epoch"):
        read_state_dict(tmp_path / "mixed.pt")
