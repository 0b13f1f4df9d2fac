"""The Broden-format reader on a hand-written broden1_224-style folder and on a generated world."""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from xai_audit.tasks.core.errors import ConfigError, ItemError, PathEscapeError
from xai_audit.tasks.data.images import BrodenItem, BrodenProbeSet, decode_label_mask

INDEX_HEADER = "image,split,ih,iw,sh,sw,color,object,part,material,scene,texture"
LABELS = """number,name,category,frequency,coverage,syns
0,-,-,0,0.0,
1,red,color(3),3,0.5,red
2,green,color(3),3,0.5,green
3,blue,color(2),2,0.2,blue
5,wall,object(3),3,0.4,wall;partition
7,kitchen,scene(2),2,1.0,kitchen
8,striped,texture(1),1,1.0,striped
9,dotted,texture(1),1,1.0,dotted
300,chair,object(4);part(9),13,0.1,chair
"""
CATEGORY_FILES = {
    "color": [(1, 1, "red"), (2, 2, "green"), (3, 3, "blue")],
    "object": [(1, 5, "wall"), (2, 300, "chair")],
    "part": [(1, 300, "chair")],
    "scene": [(1, 7, "kitchen")],
    "texture": [(1, 8, "striped"), (2, 9, "dotted")],
}  # no c_material.csv: the category still exists through index.csv's column


def _encode(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    rgb = np.zeros(labels.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    rgb[..., 2] = rng.integers(0, 256, labels.shape)  # B carries no label: must be ignored
    return rgb


def _expected_masks(i: int) -> dict[str, np.ndarray]:
    """Two planes per pixel category; label 300 needs the G channel (300 = 44 + 256)."""
    color0 = np.zeros((16, 16), np.int32)
    color0[:, :8], color0[:, 8:] = 1, 2
    color1 = np.zeros((16, 16), np.int32)
    color1[: 4 + i, :] = 3
    object0 = np.full((16, 16), 5, np.int32)
    object0[4:12, 4:12] = 300
    object1 = np.zeros((16, 16), np.int32)
    object1[i, i] = 300
    return {"color": np.stack([color0, color1]), "object": np.stack([object0, object1])}


@pytest.fixture
def broden(tmp_path) -> Path:
    """Three images (two train, one val) in the real broden1_224 layout, 32 px with 16 px masks."""
    rng = np.random.default_rng(0)
    root = tmp_path / "broden"
    (root / "images" / "ade20k").mkdir(parents=True)
    rows = [INDEX_HEADER]
    for i, split in enumerate(["train", "train", "val"]):
        stem = f"ade20k/ADE_{split}_{i:08d}"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"{stem}.jpg")
        cells = {}
        for category, planes in _expected_masks(i).items():
            names = [f"{stem}_{category}{k}.png" for k in range(2)]
            for name, plane in zip(names, planes):
                Image.fromarray(_encode(plane, rng)).save(root / "images" / name)
            cells[category] = ";".join(names)
        texture = "8;9" if i != 1 else "8"
        rows.append(f"{stem}.jpg,{split},32,32,16,16,{cells['color']},{cells['object']},,,7,{texture}")
    (root / "index.csv").write_text("\n".join(rows) + "\n")
    (root / "label.csv").write_text(LABELS)
    for category, entries in CATEGORY_FILES.items():
        lines = ["code,number,name,frequency,coverage"] + [f"{c},{n},{name},1,0.1" for c, n, name in entries]
        (root / f"c_{category}.csv").write_text("\n".join(lines) + "\n")
    return root


def _items(probe: BrodenProbeSet) -> list[BrodenItem]:
    items = list(probe)
    assert all(isinstance(i, BrodenItem) for i in items), [i for i in items if isinstance(i, ItemError)]
    return items


def test_tables_give_categories_names_and_main_category(broden):
    probe = BrodenProbeSet(broden)
    assert probe.categories == ["color", "object", "part", "material", "scene", "texture"]
    assert len(probe) == 3
    assert list(probe.labels.columns) == ["number", "name", "category"]
    assert probe.label_names[300] == "chair" and probe.label_names[8] == "striped"
    assert probe.label_category[300] == "part"  # part(9) outweighs object(4)
    assert probe.label_category[5] == "object"
    assert probe.category_labels["object"] == [5, 300]
    assert probe.category_labels["material"] == []


def test_masks_decode_r_plus_256_g_with_one_plane_per_listed_png(broden):
    items = _items(BrodenProbeSet(broden))
    for i, item in enumerate(items):
        expected = _expected_masks(i)
        assert set(item.masks) == {"color", "object"}  # empty part/material cells give nothing
        for category in ("color", "object"):
            assert item.masks[category].dtype == np.int32
            assert item.masks[category].shape == (2, 16, 16)
            np.testing.assert_array_equal(item.masks[category], expected[category])
        assert item.image_labels["scene"] == [7]
        assert (item.height, item.width) == (32, 32)
    assert items[0].image_labels["texture"] == [8, 9] and items[1].image_labels["texture"] == [8]
    assert items[2].image_id == "ade20k/ADE_val_00000002.jpg"
    assert items[2].path == (broden / "images" / "ade20k" / "ADE_val_00000002.jpg").resolve()


def test_decode_label_mask_uses_green_as_the_high_byte():
    rgb = np.array([[[44, 1, 99], [255, 255, 0], [0, 0, 7]]], dtype=np.uint8)
    assert decode_label_mask(rgb).tolist() == [[300, 65535, 0]]


def test_split_and_category_selection(broden):
    val = BrodenProbeSet(broden, split="val", categories=["object", "texture"])
    (item,) = _items(val)
    assert item.image_id.endswith("val_00000002.jpg")
    assert set(item.masks) == {"object"} and set(item.image_labels) == {"texture"}
    with pytest.raises(ConfigError, match="splits present: train, val") as info:
        BrodenProbeSet(broden, split="test")
    assert info.value.field == "probe_set.split"
    with pytest.raises(ConfigError, match="unknown categories") as info:
        BrodenProbeSet(broden, categories=["object", "colour"], field="probe_sets.0")
    assert info.value.field == "probe_sets.0.categories" and "color" in str(info.value)


def test_load_image_gives_rgb_pixels(broden):
    probe = BrodenProbeSet(broden)
    item = next(iter(probe))
    image = probe.load_image(item)
    assert (image.mode, image.size) == ("RGB", (32, 32))


def test_iteration_is_lazy(broden):
    probe = BrodenProbeSet(broden)
    assert len(list(probe.index_rows())) == 3
    items = iter(probe)
    assert inspect.isgenerator(items)
    # a file broken after construction affects only its own item, when it is reached
    (broden / "images" / "ade20k" / "ADE_val_00000002_object1.png").write_bytes(b"garbage")
    results = list(items)
    assert [type(r).__name__ for r in results] == ["BrodenItem", "BrodenItem", "ImageDecodeError"]


# --------------------------------------------------------------------------- bad rows


def test_rows_with_missing_files_are_item_errors_and_the_rest_load(broden):
    (broden / "images" / "ade20k" / "ADE_train_00000000.jpg").unlink()
    (broden / "images" / "ade20k" / "ADE_train_00000001_color1.png").unlink()
    results = list(BrodenProbeSet(broden))
    assert [type(r).__name__ for r in results] == ["ItemError", "ItemError", "BrodenItem"]
    assert results[0].item_id == "ade20k/ADE_train_00000000.jpg" and "image file" in results[0].message
    assert "segmentation file" in results[1].message and results[1].error_type == "FileNotFoundError"


def test_mask_of_another_size_is_resized_nearest_or_refused(broden):
    rng = np.random.default_rng(1)
    full = rng.choice(np.array([0, 5, 300]), size=(32, 32)).astype(np.int32)
    Image.fromarray(_encode(full, rng)).save(broden / "images" / "ade20k" / "ADE_train_00000000_object0.png")
    Image.fromarray(_encode(np.ones((8, 16), np.int32), rng)).save(
        broden / "images" / "ade20k" / "ADE_train_00000001_color0.png"
    )
    first, second, _ = list(BrodenProbeSet(broden))
    # same aspect ratio: nearest-neighbour sampling, no label is blended into a new number
    np.testing.assert_array_equal(first.masks["object"][0], full[::2, ::2])
    assert isinstance(second, ItemError) and second.error_type == "MaskSizeError"
    assert "16x8" in second.message and "16x16" in second.message


def test_bad_numbers_escaping_paths_and_duplicates_are_item_errors(broden):
    lines = (broden / "index.csv").read_text().splitlines()
    lines[1] = lines[1].replace(",32,32,16,16,", ",32,wide,16,16,")
    lines[2] = lines[2].replace("ade20k/ADE_train_00000001.jpg", "../../etc/passwd", 1)
    lines[3] = lines[3].replace(",7,", ",seven,")
    lines.append(lines[3])
    (broden / "index.csv").write_text("\n".join(lines) + "\n")
    results = list(BrodenProbeSet(broden))
    assert isinstance(results[0], ItemError) and "'iw'" in results[0].message
    assert isinstance(results[1], PathEscapeError)
    assert isinstance(results[2], ItemError) and "scene" in results[2].message
    assert results[3].error_type == "DuplicateId" and results[3].item_id == results[2].item_id
    records = list(BrodenProbeSet(broden).image_records())  # the same checks without decoding
    assert [type(r).__name__ for r in records] == ["ImageRecord", "PathEscapeError", "ImageRecord", "ItemError"]
    assert records[0].path == (broden / "images" / "ade20k" / "ADE_train_00000000.jpg").resolve()


def test_missing_or_malformed_tables_are_config_errors(broden, tmp_path):
    with pytest.raises(ConfigError, match="is not a directory"):
        BrodenProbeSet(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="index.csv is missing"):
        BrodenProbeSet(tmp_path / "empty")
    (broden / "label.csv").write_text("number,name\nx,red\n")
    with pytest.raises(ConfigError, match="not an integer"):
        BrodenProbeSet(broden)
    (broden / "label.csv").unlink()
    with pytest.raises(ConfigError, match="label.csv is missing") as info:
        BrodenProbeSet(broden, field="probe_set.root")
    assert info.value.field == "probe_set.root"
    (broden / "index.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError):
        BrodenProbeSet(broden)


def test_index_without_size_columns_takes_sizes_from_the_image(broden):
    lines = (broden / "index.csv").read_text().splitlines()
    header = "image,split,color,object,scene,texture"
    rows = [",".join(line.split(",")[i] for i in (0, 1, 6, 7, 10, 11)) for line in lines[1:]]
    (broden / "index.csv").write_text("\n".join([header, *rows]) + "\n")
    first = _items(BrodenProbeSet(broden))[0]
    assert (first.height, first.width) == (32, 32)
    # masks are 16 px, the image 32 px: same aspect ratio, so they are resampled to 32 px
    assert first.masks["object"].shape == (2, 32, 32)


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.binary(max_size=400), st.text(max_size=400).map(lambda t: (INDEX_HEADER + "\n" + t).encode())))
def test_any_index_file_loads_or_raises_only_project_errors(content):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "images").mkdir()
        (root / "label.csv").write_text(LABELS)
        (root / "index.csv").write_bytes(content)
        try:
            probe = BrodenProbeSet(root)
        except ConfigError:
            return
        for item in probe:
            assert isinstance(item, (BrodenItem, ItemError))


# --------------------------------------------------------------------------- generated world


def test_reader_agrees_with_the_generated_worlds_ground_truth(tmp_path):
    synthetic = pytest.importorskip("xai_audit.tasks.world.synthetic")
    root = synthetic.generate_world(tmp_path / "world", synthetic.WorldConfig(n_train=3, n_val=2, image_size=32))
    truth = {row["image"]: row for row in synthetic.read_attributes(root)}
    probe = BrodenProbeSet(root, split="val")
    items = _items(probe)
    assert len(items) == 2
    for item in items:
        row = truth[item.image_id]
        for category, concept in (("color", row["color"]), ("object", row["object"])):
            numbers = set(np.unique(item.masks[category]).tolist()) - {0}
            assert {probe.label_names[n] for n in numbers} == {concept}
            assert all(probe.label_category[n] == category for n in numbers)
        assert [probe.label_names[n] for n in item.image_labels["scene"]] == [row["scene"]]
        assert probe.load_image(item).size == (32, 32)
