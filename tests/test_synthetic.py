"""The synthetic world: deterministic, Broden-format, and its masks are the rendered pixels."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xai_audit.tasks.core.config import WorldConfig
from xai_audit.tasks.world import synthetic
from xai_audit.tasks.world.synthetic import (
    COLOR_RGB,
    COLORS,
    LAYOUTS,
    SHAPES,
    TEXTURES,
    Scene,
    ensure_world,
    generate_world,
    shape_mask,
    world_concepts,
)

TINY = WorldConfig(seed=3, n_train=24, n_val=8)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_world(tmp_path_factory.mktemp("w") / "world", TINY)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _labels(png: Path) -> np.ndarray:
    """Decode a Broden segmentation PNG independently: label = R + 256·G."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1]


def _world_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(world: Path, tmp_path: Path) -> None:
    again = _world_bytes(generate_world(tmp_path / "again", TINY))
    first = _world_bytes(world)
    assert again.keys() == first.keys()
    assert {"index.csv", "label.csv", "captions.csv", "c_color.csv"} <= first.keys()
    assert [name for name in first if first[name] != again[name]] == []


def test_different_seed_changes_images_and_masks(world: Path, tmp_path: Path) -> None:
    other = _world_bytes(generate_world(tmp_path / "other", WorldConfig(seed=4, n_train=24, n_val=8)))
    first = _world_bytes(world)
    masks = [name for name in first if name.endswith("_object.png")]
    assert sum(first[m] != other[m] for m in masks) > len(masks) // 2
    assert first["attributes.csv"] != other["attributes.csv"]


def test_index_lists_every_image_with_broden_columns(world: Path) -> None:
    rows = _rows(world / "index.csv")
    assert list(rows[0]) == [
        "image",
        "split",
        "ih",
        "iw",
        "sh",
        "sw",
        "color",
        "object",
        "part",
        "material",
        "scene",
        "texture",
    ]
    assert [r["split"] for r in rows].count("train") == TINY.n_train
    assert [r["split"] for r in rows].count("val") == TINY.n_val
    for r in rows:
        image = Image.open(world / "images" / r["image"])
        assert image.size == (int(r["iw"]), int(r["ih"])) == (TINY.image_size,) * 2
        for category in ("color", "object", "texture"):
            assert Image.open(world / "images" / r[category]).size == (int(r["sw"]), int(r["sh"]))
        assert r["part"] == r["material"] == ""
        assert r["scene"].isdigit()


def test_masks_match_rendered_pixels(world: Path) -> None:
    """Coloured pixels are exactly the object mask; grey ones exactly the texture mask."""
    numbers = {r["name"]: int(r["number"]) for r in _rows(world / "label.csv")}
    attributes = {r["image"]: r for r in _rows(world / "attributes.csv")}
    for r in _rows(world / "index.csv"):
        truth = attributes[r["image"]]
        pixels = np.asarray(Image.open(world / "images" / r["image"]).convert("RGB"))
        obj = _labels(world / "images" / r["object"])
        color = _labels(world / "images" / r["color"])
        texture = _labels(world / "images" / r["texture"])
        in_shape = obj == numbers[truth["object"]]
        assert set(np.unique(obj)) == {0, numbers[truth["object"]]}
        assert in_shape.sum() > 0.01 * in_shape.size
        assert (pixels[in_shape] == COLOR_RGB[truth["color"]]).all()
        grey = (pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2])
        assert (grey == ~in_shape).all()
        assert (color == np.where(in_shape, numbers[truth["color"]], 0)).all()
        assert (texture == np.where(in_shape, 0, numbers[truth["texture"]])).all()
        assert int(r["scene"]) == numbers[truth["scene"]]


def test_label_tables_agree_with_the_masks(world: Path) -> None:
    labels = _rows(world / "label.csv")
    assert (labels[0]["number"], labels[0]["name"]) == ("0", "-")
    by_number = {int(r["number"]): r for r in labels}
    assert sorted(by_number) == list(range(len(labels)))
    seen: dict[int, int] = {}
    for r in _rows(world / "index.csv"):
        used = {int(r["scene"])}
        for category in ("color", "object", "texture"):
            used |= set(np.unique(_labels(world / "images" / r[category])).tolist()) - {0}
        for number in used:
            seen[number] = seen.get(number, 0) + 1
    for number, count in seen.items():
        assert number in by_number
        assert int(by_number[number]["frequency"]) == count
        name, category = by_number[number]["name"], by_number[number]["category"]
        assert category == f"{dict(world_concepts())[name]}({count})"
    minimums = {"color": 8, "object": 4, "texture": 4, "scene": 2}
    for category, minimum in minimums.items():
        codes = _rows(world / f"c_{category}.csv")
        assert len(codes) >= minimum
        for code in codes:
            assert by_number[int(code["number"])]["name"] == code["name"]
            assert by_number[int(code["number"])]["category"].startswith(f"{category}(")


def test_captions_name_the_true_attributes(world: Path) -> None:
    attributes = {r["image"]: r for r in _rows(world / "attributes.csv")}
    captions = _rows(world / "captions.csv")
    assert len(captions) == TINY.n_train + TINY.n_val
    for row in captions:
        truth = attributes[row["image"]]
        words = row["caption"].split()
        assert {truth["color"], truth["object"], truth["texture"]} <= set(words)


def test_concepts_cover_every_category_with_unique_names() -> None:
    concepts = world_concepts()
    names = [name for name, _ in concepts]
    assert len(names) == len(set(names))
    assert len(COLORS) >= 8 and len(SHAPES) >= 4 and len(TEXTURES) >= 4 and len(LAYOUTS) >= 2
    assert {c for _, c in concepts} == {"color", "object", "texture", "scene"}


@pytest.mark.parametrize("shape", [s for s in SHAPES if s != "circle"])
def test_rasterised_polygons_have_their_shoelace_area(shape: str) -> None:
    """Point-in-polygon rasterisation checked against the polygon's exact area."""
    outline = synthetic._unit_outline(shape)
    x, y = outline[:, 0], outline[:, 1]
    exact = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    radius = 200.0
    mask = shape_mask(Scene("red", shape, "plain", "centered", 256.0, 256.0, radius, 0.0), 512)
    assert mask.sum() == pytest.approx(exact * radius**2, rel=0.01)


def test_circle_mask_area_is_pi_r_squared() -> None:
    mask = shape_mask(Scene("red", "circle", "plain", "centered", 256.0, 256.0, 200.0, 0.0), 512)
    assert mask.sum() == pytest.approx(np.pi * 200.0**2, rel=0.005)


def test_shapes_stay_inside_the_image(world: Path) -> None:
    for r in _rows(world / "index.csv"):
        obj = _labels(world / "images" / r["object"]) > 0
        assert not (obj[0].any() or obj[-1].any() or obj[:, 0].any() or obj[:, -1].any())


def test_layout_places_the_shape(world: Path) -> None:
    attributes = {r["image"]: r for r in _rows(world / "attributes.csv")}
    size = TINY.image_size
    for r in _rows(world / "index.csv"):
        ys, xs = np.nonzero(_labels(world / "images" / r["object"]))
        offset = max(abs(xs.mean() + 0.5 - size / 2), abs(ys.mean() + 0.5 - size / 2))
        if attributes[r["image"]]["scene"] == "centered":
            assert offset < 0.15 * size
        else:
            assert offset > 0.15 * size


def test_failed_generation_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(out: Path, spec: WorldConfig) -> None:
        (out / "index.csv").write_text("half")
        raise RuntimeError("killed")

    monkeypatch.setattr(synthetic, "_write_world", explode)
    with pytest.raises(RuntimeError):
        generate_world(tmp_path / "world", TINY)
    assert list(tmp_path.iterdir()) == []


def test_generate_world_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="non-empty"):
        generate_world(tmp_path, TINY)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_ensure_world_generates_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XAI_AUDIT_CACHE", str(tmp_path))
    spec = WorldConfig(seed=5, n_train=4, n_val=2)
    root = ensure_world(spec)
    assert (root / "index.csv").is_file()

    def fail(out: Path, spec: WorldConfig) -> None:
        raise AssertionError("the cached world was generated again")

    monkeypatch.setattr(synthetic, "_write_world", fail)
    assert ensure_world(spec) == root
