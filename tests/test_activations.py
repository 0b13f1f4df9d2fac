"""Activations: hooks by layer name, pooling, one pass for all layers, and the on-disk cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xai_audit.tasks.core.errors import ConfigError
from xai_audit.tasks.dissect import activations as act


class Tiny(nn.Module):
    """conv1 → relu → conv2 (+ residual added in place, like ResNet blocks) → pool → fc → relu
    (in place) → tail: two layers whose outputs the model itself changes after their hooks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.tail = nn.Linear(3, 2)
        self.calls = {"forward": 0, "tail": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls["forward"] += 1
        h = self.relu(self.conv1(x))
        out = self.conv2(h)
        out += h  # mutates conv2's output after its hook has run
        out = self.fc(out.mean(dim=(2, 3))).relu_()
        self.calls["tail"] += 1
        return self.tail(out)


def manual(model: Tiny, x: torch.Tensor) -> dict[str, torch.Tensor]:
    h = torch.relu(model.conv1(x))
    c2 = model.conv2(h)
    fc = model.fc((c2 + h).mean(dim=(2, 3)))
    return {"conv1": model.conv1(x), "conv2": c2, "fc": fc}


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_pool_units_by_output_rank():
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(act.pool_units(x, "avg"), x.mean(dim=(2, 3)))
    torch.testing.assert_close(act.pool_units(x, "max"), x.flatten(2).max(dim=2).values)
    tokens = torch.randn(2, 5, 7)
    assert torch.equal(act.pool_units(tokens, "avg"), tokens[:, 0])  # CLS token
    flat = torch.randn(2, 6)
    assert torch.equal(act.pool_units(flat, "max"), flat)
    with pytest.raises(ConfigError, match="pooling.*'median'.*avg, max"):
        act.pool_units(x, "median")
    with pytest.raises(ConfigError, match="5-D"):
        act.pool_units(torch.zeros(1, 1, 1, 1, 1), "avg")


def test_spatial_units_folds_vit_tokens_into_a_grid():
    tokens = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)  # CLS + 3×3 patches
    grid = act.spatial_units(tokens)
    assert grid.shape == (2, 3, 3, 3)
    assert torch.equal(grid[1, 2, 0, 1], tokens[1, 1 + 1, 2])  # patch (row 0, col 1), channel 2
    distilled = torch.randn(2, 2 + 16, 5)  # DeiT: CLS + distillation token + 4×4 patches
    assert torch.equal(act.spatial_units(distilled)[1, 4, 2, 3], distilled[1, 2 + 2 * 4 + 3, 4])
    with pytest.raises(ConfigError, match="no square grid"):
        act.spatial_units(torch.zeros(2, 6))


def test_channels_last_maps_and_grid_only_token_sequences_pool_over_space():
    swin = torch.randn(2, 4, 4, 7)  # Swin's [b, h, w, c] block output
    torch.testing.assert_close(act.pool_units(swin, "avg"), swin.mean(dim=(1, 2)))
    torch.testing.assert_close(act.pool_units(swin, "max"), swin.amax(dim=(1, 2)))
    assert torch.equal(act.spatial_units(swin)[1, 6, 2, 3], swin[1, 2, 3, 6])
    patches_only = torch.randn(2, 9, 5)  # a ViT without CLS token: nothing to take as the summary
    torch.testing.assert_close(act.pool_units(patches_only, "avg"), patches_only.mean(dim=1))


def test_recorder_removes_its_hooks_even_when_the_body_fails():
    model = Tiny()
    with pytest.raises(RuntimeError, match="boom"):
        with act.LayerRecorder(model, ["conv1", "fc"]):
            assert model.conv1._forward_hooks
            raise RuntimeError("boom")
    assert not model.conv1._forward_hooks and not model.fc._forward_hooks


def test_unknown_layer_is_a_config_error_listing_valid_names():
    with pytest.raises(ConfigError, match=r"no layer 'layer9'.*conv1, relu, conv2"):
        act.pooled_activations(Tiny(), ["layer9"], [images(2)])


def test_pooled_activations_match_a_manual_forward_in_one_pass():
    model = Tiny().eval()
    x = images(10)
    batches = [x[:3], (x[3:7], torch.zeros(4)), x[7:]]  # tuples as DataLoaders yield them
    got = act.pooled_activations(model, ["conv2", "conv1", "fc", "tail"], batches, pooling="max")
    assert model.calls["forward"] == 3  # one forward per batch for all four layers
    with torch.no_grad():
        want = manual(model, x)
    torch.testing.assert_close(got["conv1"], want["conv1"].amax(dim=(2, 3)))
    # conv2's output is changed in place after its hook; the record must be the layer's output.
    torch.testing.assert_close(got["conv2"], want["conv2"].amax(dim=(2, 3)))
    torch.testing.assert_close(got["fc"], want["fc"])  # before the in-place ReLU
    assert (got["fc"] < 0).any()
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in got.values())


def test_forward_stops_after_the_deepest_requested_layer():
    model = Tiny().eval()
    act.pooled_activations(model, ["conv1"], [images(2)])
    assert model.calls == {"forward": 1, "tail": 0}


def test_spatial_activations_stream_one_forward_per_batch():
    model = Tiny().eval()
    stream = act.iter_spatial_activations(model, ["conv2", "conv1"], [images(2, 1), images(3, 2)])
    first = next(stream)
    assert model.calls["forward"] == 1 and first["conv2"].shape == (2, 4, 8, 8)
    with torch.no_grad():
        want = manual(model, images(2, 1))
    torch.testing.assert_close(first["conv2"], want["conv2"])
    torch.testing.assert_close(first["conv1"], want["conv1"])  # before the in-place ReLU
    assert (first["conv1"] < 0).any()
    assert next(stream)["conv1"].shape == (3, 4, 8, 8)
    assert model.calls["forward"] == 2
    stream.close()
    assert not model.conv1._forward_hooks


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XAI_AUDIT_CACHE", str(tmp_path))
    return tmp_path


def test_cache_computes_only_missing_layers_and_reuses_files(isolated_cache, monkeypatch):
    model = Tiny().eval()
    x = images(6)
    computed: list[list[str]] = []
    real = act.pooled_activations

    def spy(module, layers, batches, *args, **kwargs):
        computed.append(list(layers))
        return real(module, layers, batches, *args, **kwargs)

    monkeypatch.setattr(act, "pooled_activations", spy)
    ident = dict(model_identity="tiny@w1", probe_identity="probe-1", pooling="avg")
    first = act.cached_pooled_activations(model, ["conv1"], lambda: [x[:4], x[4:]], **ident)
    both = act.cached_pooled_activations(model, ["conv2", "conv1"], lambda: [x], **ident)
    again = act.cached_pooled_activations(model, ["conv1", "conv2"], lambda: pytest.fail("recomputed"), **ident)
    assert computed == [["conv1"], ["conv2"]]
    assert list(both) == ["conv2", "conv1"]
    torch.testing.assert_close(again["conv1"], first["conv1"])
    torch.testing.assert_close(again["conv2"], both["conv2"])
    files = list((isolated_cache / "activations").rglob("*"))
    assert not [f for f in files if f.name.endswith(".tmp")]

    act.cached_pooled_activations(model, ["conv1"], lambda: [x], **{**ident, "pooling": "max"})
    act.cached_pooled_activations(model, ["conv1"], lambda: [x], **{**ident, "model_identity": "tiny@w2"})
    assert computed[2:] == [["conv1"], ["conv1"]]


def test_unreadable_cache_file_is_recomputed(isolated_cache):
    model = Tiny().eval()
    ident = dict(model_identity="tiny", probe_identity="p", pooling="avg")
    first = act.cached_pooled_activations(model, ["fc"], lambda: [images(3)], **ident)
    [path] = (isolated_cache / "activations").rglob("*.safetensors")
    path.write_bytes(b"truncated")
    second = act.cached_pooled_activations(model, ["fc"], lambda: [images(3)], progress=True, **ident)
    torch.testing.assert_close(second["fc"], first["fc"])
    assert act.read_cached_tensor(path) is not None
