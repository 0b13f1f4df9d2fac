"""The synthetic world: coloured shapes on textured backgrounds, written in Broden's format.

Real weights and datasets cannot be fetched offline, so the default audit runs on a world whose
every concept and pixel we know. Each image holds one shape (object) of one colour on one
background texture, placed by one layout (scene). Shape pixels are exactly the colour's RGB and
background pixels are grey (R = G = B), so the pixel-level masks match the rendered pixels exactly.

On disk (Broden layout, every path in ``index.csv`` relative to ``images/``):
- ``index.csv``: image, split, ih, iw, sh, sw, color, object, part, material, scene, texture.
  color/object/texture cells name one segmentation PNG each (label = R + 256·G); the scene cell
  holds the layout's label number. texture is pixel-level here (the background region), unlike
  real Broden, so Network Dissection can score texture detectors by IoU.
- ``label.csv``: number, name, category (``color(N)``), frequency (images), coverage (summed
  pixel fraction, in images), syns. Number 0 is ``-`` (unlabelled).
- ``c_<category>.csv``: code, number, name, frequency, coverage.
- ``captions.csv`` (image, caption) and ``attributes.csv`` (image, split, color, object, texture,
  scene: concept names), the ground truth the demo model and the toy CLIP train on.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from xai_audit.tasks.core.cache import cache_dir
from xai_audit.tasks.core.config import WorldConfig
from xai_audit.tasks.core.progress import track

WORLD_VERSION = "1"

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 145, 30),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 210),
    "blue": (40, 70, 220),
    "purple": (130, 50, 190),
    "magenta": (220, 50, 190),
}
COLORS: tuple[str, ...] = tuple(COLOR_RGB)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
TEXTURES: tuple[str, ...] = ("striped", "checkered", "dotted", "noisy", "plain")
LAYOUTS: tuple[str, ...] = ("centered", "corner")
LAYOUT_PHRASES: dict[str, str] = {"centered": "in the center", "corner": "in a corner"}

# Broden category of each attribute, in label-number order.
CATEGORY_CONCEPTS: dict[str, tuple[str, ...]] = {
    "color": COLORS,
    "object": SHAPES,
    "texture": TEXTURES,
    "scene": LAYOUTS,
}
INDEX_COLUMNS: tuple[str, ...] = (
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
)
SPLITS: tuple[str, ...] = ("train", "val")


@dataclass(frozen=True)
class Scene:
    """The sampled attributes and geometry of one image."""

    color: str
    shape: str
    texture: str
    layout: str
    cx: float
    cy: float
    radius: float
    angle: float


def world_concepts() -> list[tuple[str, str]]:
    """Every concept of the world as (name, Broden category), in label-number order."""
    return [(name, cat) for cat, names in CATEGORY_CONCEPTS.items() for name in names]


def label_numbers() -> dict[str, int]:
    """Global Broden label number of every concept name (0 is reserved for unlabelled)."""
    return {name: i + 1 for i, (name, _) in enumerate(world_concepts())}


def describe(attrs: Mapping[str, str], mention: Iterable[str] = tuple(CATEGORY_CONCEPTS), bare: bool = False) -> str:
    """A caption naming exactly the attributes in ``mention`` (bare: the single word alone).

    ``attrs`` maps category (color, object, texture, scene) to concept name; by default every
    attribute is named, which is the caption written to ``captions.csv``.
    """
    mention = frozenset(mention)
    if bare:
        (only,) = mention
        return attrs[only]
    if mention == {"texture"}:
        return f"a {attrs['texture']} background"
    words = ["a"]
    if "color" in mention:
        words.append(attrs["color"])
    words.append(attrs["object"] if "object" in mention else "shape")
    if "texture" in mention:
        words += ["on a", attrs["texture"], "background"]
    if "scene" in mention:
        words.append(LAYOUT_PHRASES[attrs["scene"]])
    return " ".join(words)


def sample_scene(rng: np.random.Generator, spec: WorldConfig) -> Scene:
    """Draw one image's attributes uniformly and place the shape fully inside the image."""
    size = spec.image_size
    color = COLORS[rng.integers(len(COLORS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    layout = LAYOUTS[rng.integers(len(LAYOUTS))]
    radius = size * rng.uniform(spec.min_radius, spec.max_radius)
    angle = rng.uniform(-spec.max_tilt, spec.max_tilt)
    margin = 0.04 * size
    if layout == "centered":
        cx, cy = size / 2 + rng.uniform(-0.06, 0.06, size=2) * size
    else:
        near = radius + margin + rng.uniform(0.0, 0.04 * size, size=2)
        flip = rng.integers(2, size=2).astype(bool)
        cx, cy = np.where(flip, size - near, near)
    return Scene(color, shape, texture, layout, float(cx), float(cy), float(radius), float(angle))


def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    return xs, ys


def _polygon_mask(xs: np.ndarray, ys: np.ndarray, vx: np.ndarray, vy: np.ndarray) -> np.ndarray:
    """Pixels whose centre lies inside the polygon (even-odd rule): no anti-aliasing, exact."""
    inside = np.zeros(xs.shape, dtype=bool)
    for i in range(len(vx)):
        x1, y1, x2, y2 = vx[i], vy[i], vx[i - 1], vy[i - 1]
        if y1 == y2:
            continue
        crosses = (y1 > ys) != (y2 > ys)
        x_cross = x1 + (ys - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (xs < x_cross)
    return inside


def _unit_outline(shape: str) -> np.ndarray:
    """Polygon vertices (k×2) of a shape inscribed in the unit circle."""
    if shape == "square":
        t = np.pi / 4 + np.arange(4) * np.pi / 2
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if shape == "triangle":
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if shape == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    if shape == "cross":
        a = 0.32
        b = float(np.sqrt(1.0 - a * a))
        quarter = np.array([[a, -b], [a, -a], [b, -a]])
        turns = [
            np.array([[np.cos(k * np.pi / 2), -np.sin(k * np.pi / 2)], [np.sin(k * np.pi / 2), np.cos(k * np.pi / 2)]])
            for k in range(4)
        ]
        return np.concatenate([quarter @ rot.T for rot in turns])
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def shape_mask(scene: Scene, size: int) -> np.ndarray:
    """Boolean (size×size) mask of the shape's pixels."""
    xs, ys = _pixel_centres(size)
    if scene.shape == "circle":
        return (xs - scene.cx) ** 2 + (ys - scene.cy) ** 2 <= scene.radius**2
    outline = _unit_outline(scene.shape)
    c, s = np.cos(scene.angle), np.sin(scene.angle)
    vx = scene.cx + scene.radius * (c * outline[:, 0] - s * outline[:, 1])
    vy = scene.cy + scene.radius * (s * outline[:, 0] + c * outline[:, 1])
    return _polygon_mask(xs, ys, vx, vy)


def _tones(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(30, 111)), int(rng.integers(150, 231))


def _striped(rng: np.random.Generator, size: int) -> np.ndarray:
    dark, light = _tones(rng)
    theta = rng.integers(4) * np.pi / 4
    half = rng.uniform(4.0, 7.0)
    xs, ys = _pixel_centres(size)
    band = np.floor((xs * np.cos(theta) + ys * np.sin(theta)) / half + rng.uniform(0, 2)) % 2
    return np.where(band == 0, dark, light).astype(np.uint8)


def _checkered(rng: np.random.Generator, size: int) -> np.ndarray:
    dark, light = _tones(rng)
    cell = int(rng.integers(8, 15))
    ox, oy = rng.integers(cell, size=2)
    ys, xs = np.mgrid[0:size, 0:size]
    parity = ((xs + ox) // cell + (ys + oy) // cell) % 2
    return np.where(parity == 0, dark, light).astype(np.uint8)


def _dotted(rng: np.random.Generator, size: int) -> np.ndarray:
    dark, light = _tones(rng)
    period = rng.uniform(10.0, 14.0)
    radius = rng.uniform(2.0, 3.5)
    xs, ys = _pixel_centres(size)
    ox, oy = rng.uniform(0, period, size=2)
    dx = (xs + ox) % period - period / 2
    dy = (ys + oy) % period - period / 2
    return np.where(dx**2 + dy**2 <= radius**2, dark, light).astype(np.uint8)


def _noisy(rng: np.random.Generator, size: int) -> np.ndarray:
    dark, light = _tones(rng)
    block = 4  # coarse enough to survive the toy CLIP's 2× downsampling
    cells = rng.integers(dark, light + 1, size=(-(-size // block),) * 2)
    return np.kron(cells, np.ones((block, block), dtype=np.int64))[:size, :size].astype(np.uint8)


def _plain(rng: np.random.Generator, size: int) -> np.ndarray:
    return np.full((size, size), int(rng.integers(50, 211)), dtype=np.uint8)


_TEXTURE_PAINTERS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "striped": _striped,
    "checkered": _checkered,
    "dotted": _dotted,
    "noisy": _noisy,
    "plain": _plain,
}


def render(scene: Scene, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The RGB image (size×size×3 uint8) and the shape mask of one scene."""
    grey = _TEXTURE_PAINTERS[scene.texture](rng, size)
    image = np.repeat(grey[:, :, None], 3, axis=2)
    mask = shape_mask(scene, size)
    image[mask] = COLOR_RGB[scene.color]
    return image, mask


def encode_segmentation(labels: np.ndarray) -> np.ndarray:
    """Broden's segmentation encoding: label = R + 256·G (B unused), as an RGB uint8 array."""
    out = np.zeros(labels.shape + (3,), dtype=np.uint8)
    out[..., 0] = labels % 256
    out[..., 1] = labels // 256
    return out


def _scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # One stream per image: an image never changes when n_train/n_val change.
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _iter_scenes(spec: WorldConfig) -> Iterator[tuple[str, int, Scene, np.random.Generator]]:
    for split, count in (("train", spec.n_train), ("val", spec.n_val)):
        for i in range(count):
            rng = _scene_rng(spec.seed, split, i)
            yield split, i, sample_scene(rng, spec), rng


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array, mode="RGB").save(path, format="PNG", compress_level=6)


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_world(out: Path, spec: WorldConfig) -> None:
    size = spec.image_size
    numbers = label_numbers()
    category_of = dict(world_concepts())
    frequency = dict.fromkeys(numbers, 0)
    coverage = dict.fromkeys(numbers, 0.0)
    index_rows: list[list[object]] = []
    caption_rows: list[list[object]] = []
    attribute_rows: list[list[object]] = []
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True)
    scenes = track(_iter_scenes(spec), f"synthetic world ({spec.image_size} px)", spec.n_train + spec.n_val, "images")
    for split, i, scene, rng in scenes:
        stem = f"{split}/{i:05d}"
        image, mask = render(scene, rng, size)
        _save_png(image, out / "images" / f"{stem}.png")
        object_fraction = float(mask.mean())
        regions = {
            "color": (scene.color, mask),
            "object": (scene.shape, mask),
            "texture": (scene.texture, ~mask),
        }
        for category, (name, region) in regions.items():
            _save_png(
                encode_segmentation(np.where(region, numbers[name], 0)), out / "images" / f"{stem}_{category}.png"
            )
        fractions = {
            scene.color: object_fraction,
            scene.shape: object_fraction,
            scene.texture: 1.0 - object_fraction,
            scene.layout: 1.0,
        }
        for name, fraction in fractions.items():
            frequency[name] += 1
            coverage[name] += fraction
        index_rows.append(
            [
                f"{stem}.png",
                split,
                size,
                size,
                size,
                size,
                f"{stem}_color.png",
                f"{stem}_object.png",
                "",
                "",
                numbers[scene.layout],
                f"{stem}_texture.png",
            ]
        )
        attrs = {"color": scene.color, "object": scene.shape, "texture": scene.texture, "scene": scene.layout}
        caption_rows.append([f"{stem}.png", describe(attrs)])
        attribute_rows.append([f"{stem}.png", split, *attrs.values()])
    _write_csv(out / "index.csv", list(INDEX_COLUMNS), index_rows)
    _write_csv(out / "captions.csv", ["image", "caption"], caption_rows)
    _write_csv(out / "attributes.csv", ["image", "split", *CATEGORY_CONCEPTS], attribute_rows)
    label_rows: list[list[object]] = [[0, "-", "-", 0, "0.000000", ""]]
    label_rows += [
        [numbers[name], name, f"{category_of[name]}({frequency[name]})", frequency[name], f"{coverage[name]:.6f}", name]
        for name in numbers
    ]
    _write_csv(out / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"], label_rows)
    for category, names in CATEGORY_CONCEPTS.items():
        rows: list[list[object]] = [
            [code, numbers[name], name, frequency[name], f"{coverage[name]:.6f}"]
            for code, name in enumerate(names, start=1)
        ]
        _write_csv(out / f"c_{category}.csv", ["code", "number", "name", "frequency", "coverage"], rows)


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """A temp sibling of ``final`` to fill; renamed to ``final`` only if the block succeeds.

    A killed writer leaves a ``.tmp-*`` sibling, never a half-written ``final``. If another
    process published ``final`` first, ours is discarded (same key, same content).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make a shared cache unreadable to other users
    try:
        yield tmp
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final.is_dir() and any(final.iterdir())):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generate_world(root: Path, spec: WorldConfig) -> Path:
    """Write the world into ``root`` (absent or empty), atomically (see ``atomic_directory``)."""
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root}: refusing to write a world into a non-empty directory")
    with atomic_directory(root) as tmp:
        _write_world(tmp, spec)
    return root


def ensure_world(spec: WorldConfig = WorldConfig()) -> Path:
    """The cached world for ``spec`` (generated on first use), keyed by generator version + spec."""
    root = cache_dir("world", version=WORLD_VERSION, spec=spec.model_dump()) / "broden"
    if not (root / "index.csv").is_file():
        with atomic_directory(root) as tmp:
            _write_world(tmp, spec)
    return root


def read_attributes(root: Path, split: str | None = None) -> list[dict[str, str]]:
    """Rows of ``attributes.csv`` (image, split, color, object, texture, scene), optionally one split."""
    with (Path(root) / "attributes.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if split is None or r["split"] == split]
