"""Probe-set and concept-set cases of the bad-input matrix, through what the dissect stage runs."""

from __future__ import annotations

import csv
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.robustness.audit_files import write_config
from xai_audit.flows.cli import main
from xai_audit.tasks.core.config import WorldConfig, parse_config
from xai_audit.tasks.core.errors import ConfigError, ItemError
from xai_audit.tasks.data.images import BrodenItem, BrodenProbeSet, ImageRecord
from xai_audit.tasks.dissect.clip_dissect import load_concepts
from xai_audit.tasks.dissect.probe import dissect_batches, open_probe
from xai_audit.tasks.world.synthetic import generate_world

N_VAL = 8


@pytest.fixture(scope="module")
def pristine_world(tmp_path_factory) -> Path:
    return generate_world(tmp_path_factory.mktemp("world") / "w", WorldConfig(image_size=32, n_train=1, n_val=N_VAL))


@pytest.fixture
def world(pristine_world, tmp_path) -> Path:
    """A private copy of a small generated world (Broden format) to break."""
    return Path(shutil.copytree(pristine_world, tmp_path / "w"))


def probe_config(root: Path):
    return parse_config({"device": "cpu", "dissect": {"probe": {"kind": "broden", "root": str(root), "batch_size": 3}}})


def val_ids() -> list[str]:
    return [f"val/{index:05d}.png" for index in range(N_VAL)]


def _flat_pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def assert_batches_aligned(world: Path, probe) -> None:
    """Every Network Dissection batch pairs each image's activations with that image's own masks."""
    seen = []
    module = torch.nn.Sequential(torch.nn.Identity())  # layer "0" hands the pixels on: activations are the image
    for batch in dissect_batches(probe, _flat_pixels, module, ["0"], 3, torch.device("cpu")):
        for image_id, pixels, masks in zip(batch.image_ids, batch.acts["0"], batch.masks):
            expected = np.asarray(Image.open(world / "images" / image_id).convert("RGB"), dtype=np.float32) / 255
            np.testing.assert_allclose(pixels.permute(1, 2, 0).numpy(), expected)
            assert masks["object"].shape[-2:] == pixels.shape[-2:]
            seen.append(image_id)
    assert seen == probe.image_ids


def test_index_rows_with_missing_files_become_probe_errors_and_the_rest_stay_aligned(world):
    ids = val_ids()
    (world / "images" / ids[1]).unlink()
    (world / "images" / ids[4].replace(".png", "_texture.png")).unlink()
    probe = open_probe(probe_config(world))
    assert {error["item_id"]: error["stage"] for error in probe.errors} == {ids[1]: "probe", ids[4]: "probe"}
    assert all(error["error_type"] == "FileNotFoundError" and "missing" in error["message"] for error in probe.errors)
    assert probe.image_ids == [image_id for index, image_id in enumerate(ids) if index not in (1, 4)]
    assert_batches_aligned(world, probe)


def test_masks_of_another_size_are_resampled_when_proportional_and_refused_otherwise(world):
    ids = val_ids()
    half = world / "images" / ids[2].replace(".png", "_object.png")
    original = np.asarray(Image.open(half).convert("RGB"))
    Image.fromarray(original[::2, ::2]).save(half)  # half size, same aspect: nearest-neighbour back to 32 px
    wide = world / "images" / ids[5].replace(".png", "_color.png")
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(wide)  # other aspect: would mislabel pixels
    probe = open_probe(probe_config(world))
    assert [(error["item_id"], error["error_type"]) for error in probe.errors] == [(ids[5], "MaskSizeError")]
    assert "64x32" in probe.errors[0]["message"]
    assert ids[2] in probe.image_ids and ids[5] not in probe.image_ids
    item = next(
        item
        for item in BrodenProbeSet(world, split="val")
        if not isinstance(item, ItemError) and item.image_id == ids[2]
    )
    labels = original[..., 0].astype(np.int32) + 256 * original[..., 1].astype(np.int32)
    np.testing.assert_array_equal(item.masks["object"][0], np.repeat(np.repeat(labels[::2, ::2], 2, axis=0), 2, axis=1))
    assert_batches_aligned(world, probe)


# --------------------------------------------------------------------------- concept sets


def concept_config(tmp_path: Path, content: bytes) -> Path:
    (tmp_path / "concepts.txt").write_bytes(content)
    return write_config(
        tmp_path, {"dissect": {"methods": ["clip_dissect"], "concepts": {"source": "file", "path": "concepts.txt"}}}
    )


def test_concept_file_with_blank_lines_and_duplicates_is_valid_and_deduplicated(tmp_path, capsys):
    content = "\ufeffred\n\n   \nstriped\nred\n  circle  \r\n\t\nstriped\n".encode()
    assert main(["validate", str(concept_config(tmp_path, content))]) == 0
    assert load_concepts(tmp_path / "concepts.txt") == ["red", "striped", "circle"]


@pytest.mark.parametrize(
    ("content", "line", "problem"),
    [
        (b"red\nblue\n" + b"x" * 5000 + b"\n", 3, "5000 characters"),
        (b"red\ncaf\xe9\n", 2, "not valid UTF-8"),
        (b"red\n\xff\xfe\x00b\x00\n", 2, "not valid UTF-8"),
    ],
    ids=["very long line", "latin-1 byte", "utf-16 text"],
)
def test_concept_file_with_a_long_or_undecodable_line_exits_2_naming_field_and_line(
    tmp_path, capsys, content, line, problem
):
    assert main(["validate", str(concept_config(tmp_path, content))]) == 2
    err = capsys.readouterr().err
    assert "dissect.concepts.path:" in err and f"line {line}" in err and problem in err


# --------------------------------------------------------------------------- fuzz

INDEX_HEADER = ["image", "split", "ih", "iw", "sh", "sw", "color", "object", "scene"]
LABELS = "number,name,category\n0,-,-\n1,red,color(1)\n2,circle,object(1)\n3,beach,scene(1)\n"
_CELLS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        ["", "val", "32", "0", "-4", "16", "x.png", "a.png;b.png", "1;2", "../../etc/passwd", "/abs.png", "im.png"]
    ),
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(st.lists(_CELLS, min_size=0, max_size=len(INDEX_HEADER) + 2), max_size=6),
    header=st.sampled_from([INDEX_HEADER, INDEX_HEADER[:1] + INDEX_HEADER[6:], ["image", "image"], ["split"]]),
)
def test_any_index_rows_load_or_raise_only_project_errors(pristine_world, rows, header):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "images").mkdir()
        shutil.copy(pristine_world / "images" / "val" / "00000.png", root / "images" / "im.png")
        Image.new("RGB", (16, 16)).save(root / "images" / "x.png")
        (root / "label.csv").write_text(LABELS)
        text = io.StringIO()
        csv.writer(text).writerows([header, *rows])
        (root / "index.csv").write_text(text.getvalue(), encoding="utf-8", errors="surrogatepass")
        try:
            probe = BrodenProbeSet(root)
        except ConfigError:
            return
        assert all(isinstance(item, (BrodenItem, ItemError)) for item in probe)
        for record in probe.image_records():
            assert isinstance(record, ItemError) or (
                isinstance(record, ImageRecord) and record.path.is_relative_to(root.resolve() / "images")
            )
