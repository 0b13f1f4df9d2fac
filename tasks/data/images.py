"""Image sets, robust image decoding and the Broden-format probe-set reader.

Every listing function is a generator that yields either a usable record or the
:class:`~xai_audit.tasks.core.errors.ItemError` that made one item unusable, so a caller writes one ``errors``
row for that item and goes on with the rest::

    for item in iter_image_list("images.csv", root):
        if isinstance(item, ItemError):
            record_error(stage="list", item_id=item.item_id, error=item)
            continue
        image = load_rgb(item.path, item_id=item.image_id)   # may raise ImageDecodeError

Yielding the error instead of a record with an ``error`` field means a path that escapes the
root never exists as a usable :class:`ImageRecord`.

Image ids are POSIX paths relative to the set's root. Paths that leave the root (``..``, an
absolute path, a symlink resolving outside) are refused with :class:`PathEscapeError`.
"""

from __future__ import annotations

import csv
import difflib
import os
import posixpath
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from xai_audit.tasks.core.errors import ConfigError, ImageDecodeError, ItemError, PathEscapeError

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".pbm",
)

#: Transparent pixels are composited onto white: transparent web images (logos, cut-outs) are
#: shown on white pages, so this is what a person looking at the image saw.
ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)

LIST_COLUMNS: tuple[str, ...] = ("path", "label", "label_name", "mask", "x0", "y0", "x1", "y1")
_BOX_COLUMNS = ("x0", "y0", "x1", "y1")


@dataclass(frozen=True)
class ImageRecord:
    """One image of an image set: where it is and its optional ground truth."""

    image_id: str
    path: Path
    label: int | None = None
    label_name: str | None = None
    mask_path: Path | None = None
    box: tuple[int, int, int, int] | None = None


ImageItems = Iterator["ImageRecord | ItemError"]


# --------------------------------------------------------------------------- paths


def safe_join(root: str | os.PathLike[str], relative: str, item_id: str | None = None) -> Path:
    """``root / relative`` with symlinks resolved, refused when it ends up outside ``root``.

    The returned path is the resolved one. Raises :class:`PathEscapeError` (an item error) for
    an absolute path, a ``..`` that climbs out, or a symlink whose target lies outside ``root``.
    """
    return _join_under(os.path.realpath(root), relative, relative if item_id is None else item_id)


def _join_under(root_real: str, relative: str, item_id: str) -> Path:
    """:func:`safe_join` for an already resolved root (string work only: lists may be 100k long)."""
    if "\x00" in relative:
        raise PathEscapeError(item_id, "path contains a NUL byte")
    if relative.startswith("/") or os.path.isabs(relative):
        raise PathEscapeError(item_id, f"absolute path {relative!r}; paths must be relative to the set root")
    try:
        resolved = os.path.realpath(os.path.join(root_real, relative))
    except (OSError, RuntimeError, ValueError) as exc:  # name too long, symlink loop, ...
        raise ItemError(item_id, f"cannot resolve path {relative!r}: {exc}", type(exc).__name__) from None
    prefix = root_real if root_real.endswith(os.sep) else root_real + os.sep
    if not resolved.startswith(prefix):
        raise PathEscapeError(item_id, f"path {relative!r} resolves to {resolved}, outside the set root {root_real}")
    return Path(resolved)


def _normalized_id(relative: str) -> str:
    """The POSIX id of a relative path: ``a/./b/../c.jpg`` -> ``a/c.jpg``."""
    return posixpath.normpath(relative.replace(os.sep, "/"))


# --------------------------------------------------------------------------- folders


def _sorted_entries(directory: Path) -> list[tuple[str, bool, bool]]:
    """(name, is_dir, is_symlink) of a directory's non-hidden entries, sorted by name."""
    with os.scandir(directory) as it:
        entries = [(e.name, e.is_dir(follow_symlinks=True), e.is_symlink()) for e in it if not e.name.startswith(".")]
    entries.sort()
    return entries


def iter_image_folder(
    root: str | os.PathLike[str],
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
    class_names: Sequence[str] | None = None,
    class_folders: bool | None = None,
) -> ImageItems:
    """Image records for every image file under ``root``, recursively, in sorted order.

    Lazy: directories are listed one at a time as the generator advances (each directory's
    names are sorted, which needs that one listing in memory), so 100k files never become 100k
    objects at once. Hidden entries (``.name``) are skipped.

    Class folders (ImageFolder style): when ``class_folders`` is None they are detected — the
    root holds sub-folders and no image file of its own. Then each image's ``label_name`` is its
    first-level folder and ``label`` that folder's index among the sorted first-level folders
    (as torchvision's ``ImageFolder``), or its index in ``class_names`` when given (``None`` for
    a folder not in the list).

    Yields :class:`PathEscapeError` for a symlink (file or directory) that resolves outside the
    root. A symlinked file inside the root is listed under its own name; a symlinked directory
    inside the root is not followed (its target is listed under its real path, and no cycle
    can form).
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise ConfigError("images.root", f"{root_path} is not a directory")
    root_resolved = root_path.resolve()
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    top = _sorted_entries(root_resolved)
    if class_folders is None:
        has_dirs = any(is_dir for _, is_dir, _ in top)
        has_images = any(not is_dir and name.lower().endswith(exts) for name, is_dir, _ in top)
        class_folders = has_dirs and not has_images
    index: dict[str, int] = {}
    if class_folders:
        names = list(class_names) if class_names is not None else [n for n, d, _ in top if d]
        index = {name: i for i, name in enumerate(names)}

    def walk(directory: Path, prefix: str, entries: list[tuple[str, bool, bool]]) -> ImageItems:
        for name, is_dir, is_link in entries:
            rel = f"{prefix}{name}"
            path = directory / name
            if is_link:
                target = path.resolve()
                if not target.is_relative_to(root_resolved):
                    yield PathEscapeError(rel, f"symlink resolves to {target}, outside the set root {root_resolved}")
                    continue
                if is_dir:  # its target is listed under its real path already (and no cycles)
                    continue
            if is_dir:
                try:
                    children = _sorted_entries(path)
                except OSError as exc:
                    yield ItemError(rel, f"cannot list directory: {exc}", error_type=type(exc).__name__)
                    continue
                yield from walk(path, f"{rel}/", children)
            elif name.lower().endswith(exts):
                label_name = rel.split("/", 1)[0] if class_folders and "/" in rel else None
                yield ImageRecord(
                    image_id=rel,
                    path=path,
                    label=index.get(label_name) if label_name is not None else None,
                    label_name=label_name,
                )

    return walk(root_resolved, "", top)


# --------------------------------------------------------------------------- lists


def iter_image_list(
    list_file: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
    class_names: Sequence[str] | None = None,
) -> ImageItems:
    """Image records from a list file, one item per line, streamed.

    ``*.csv``: a header naming some of ``path, label, label_name, mask, x0, y0, x1, y1`` (``path``
    required); ``label`` may be an integer index or a class name (mapped through
    ``class_names`` when given); a box needs all four corners with ``x0 < x1``, ``y0 < y1``.
    Any other extension: plain text, one path per line. Blank lines and lines starting with
    ``#`` are skipped. Quoted fields may not span lines.

    Paths (and mask paths) are relative to ``root`` (default: the list file's folder). A path
    leaving the root, a duplicate id (the later occurrences), a line that is not UTF-8 or a bad
    label/box is yielded as an :class:`ItemError` whose ``item_id`` is the path as written (or
    ``list.csv:LINE`` when the line has none). The file existing and having a valid header is
    checked eagerly, when the function is called: a bad list is a :class:`ConfigError`.
    """
    list_path = Path(list_file)
    if not list_path.is_file():
        raise ConfigError("images.list_file", f"{list_path} is not a file")
    root_path = Path(root) if root is not None else list_path.parent
    if not root_path.is_dir():
        raise ConfigError("images.root", f"{root_path} is not a directory")
    is_csv = list_path.suffix.lower() == ".csv"
    columns: list[str] | None = None
    if is_csv:
        columns = _read_list_header(list_path)
    name_index = {n: i for i, n in enumerate(class_names)} if class_names is not None else None
    return _iter_list_items(list_path, os.path.realpath(root_path), columns, name_index)


def _read_list_header(list_path: Path) -> list[str]:
    with list_path.open("rb") as f:
        first = f.readline()
    try:
        header_line = first.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError("images.list_file", f"{list_path}: header is not UTF-8 ({exc.reason})") from None
    try:
        header = [c.strip().lower() for c in next(csv.reader([header_line]), [])]
    except csv.Error as exc:
        raise ConfigError("images.list_file", f"{list_path}: header is not valid CSV ({exc})") from None
    unknown = [c for c in header if c not in LIST_COLUMNS]
    if "path" not in header or unknown or len(set(header)) != len(header):
        raise ConfigError(
            "images.list_file",
            f"{list_path}: header {header} must name 'path' and only columns from "
            f"{', '.join(LIST_COLUMNS)}, each once" + (f" (unknown: {', '.join(unknown)})" if unknown else ""),
        )
    present_box = [c for c in _BOX_COLUMNS if c in header]
    if present_box and len(present_box) != 4:
        raise ConfigError("images.list_file", f"{list_path}: a box needs all of x0, y0, x1, y1, got {present_box}")
    return header


def _iter_list_items(
    list_path: Path,
    root: str,
    columns: list[str] | None,
    name_index: dict[str, int] | None,
) -> ImageItems:
    seen: set[str] = set()
    with list_path.open("rb") as f:
        if columns is not None:
            f.readline()
        for lineno, raw in enumerate(f, start=2 if columns is not None else 1):
            where = f"{list_path.name}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                yield ItemError(where, f"line is not valid UTF-8 ({exc.reason})", "UnicodeDecodeError")
                continue
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if columns is None:
                row = {"path": line.strip()}
            else:
                try:
                    values = next(csv.reader([line]), [])
                except csv.Error as exc:  # e.g. a field over csv.field_size_limit()
                    yield ItemError(where, f"not a valid CSV line: {exc}", "CsvError")
                    continue
                if len(values) != len(columns):
                    yield ItemError(where, f"expected {len(columns)} fields ({', '.join(columns)}), got {len(values)}")
                    continue
                row = {c: v.strip() for c, v in zip(columns, values)}
            yield _list_record(row, root, where, seen, name_index)


def _list_record(
    row: dict[str, str], root: str, where: str, seen: set[str], name_index: dict[str, int] | None
) -> ImageRecord | ItemError:
    relative = row["path"]
    if not relative:
        return ItemError(where, "empty path")
    image_id = _normalized_id(relative)
    try:
        path = _join_under(root, relative, relative)
    except PathEscapeError as exc:
        return exc
    if image_id in seen:
        return ItemError(
            image_id, f"duplicate id (an earlier line of the list already names it; {where})", "DuplicateId"
        )
    seen.add(image_id)

    label: int | None = None
    label_name = row.get("label_name") or None
    raw_label = row.get("label") or ""
    if raw_label:
        if re.fullmatch(r"[+-]?\d+", raw_label):
            label = int(raw_label)
            if label < 0 or (name_index is not None and label >= len(name_index)):
                return ItemError(
                    image_id, f"label {label} out of range" + (f" 0..{len(name_index) - 1}" if name_index else "")
                )
        else:
            label_name = label_name or raw_label
    if label_name is not None and label is None and name_index is not None:
        if label_name not in name_index:
            close = difflib.get_close_matches(label_name, list(name_index), n=3)
            return ItemError(
                image_id, f"unknown class name {label_name!r}" + (f"; closest: {', '.join(close)}" if close else "")
            )
        label = name_index[label_name]

    mask_path = None
    if row.get("mask"):
        try:
            mask_path = _join_under(root, row["mask"], image_id)
        except PathEscapeError as exc:
            return exc

    box = None
    if any(row.get(c) for c in _BOX_COLUMNS):
        try:
            x0, y0, x1, y1 = (int(row[c]) for c in _BOX_COLUMNS)
        except (KeyError, ValueError):
            return ItemError(
                image_id, f"box needs four integers x0, y0, x1, y1, got {[row.get(c) for c in _BOX_COLUMNS]}"
            )
        if not (0 <= x0 < x1 and 0 <= y0 < y1):
            return ItemError(image_id, f"box ({x0}, {y0}, {x1}, {y1}) must satisfy 0 <= x0 < x1 and 0 <= y0 < y1")
        box = (x0, y0, x1, y1)
    return ImageRecord(image_id, path, label, label_name, mask_path, box)


# --------------------------------------------------------------------------- decoding


def load_rgb(path: str | os.PathLike[str], item_id: str | None = None) -> Image.Image:
    """Decode an image file into an 8-bit RGB image, or raise :class:`ImageDecodeError`.

    - EXIF orientation is applied (a broken EXIF block leaves the pixels as stored).
    - Grayscale, palette, CMYK, YCbCr, LAB, HSV become RGB; images with alpha (RGBA, LA, PA,
      palette with transparency) are composited onto :data:`ALPHA_BACKGROUND` (white).
    - 16-bit images (``I;16*``) are scaled to 8 bits (``round(v / 257)``); 32-bit integer ``I``
      is read as 16-bit when its values lie in 0..65535, otherwise min-max stretched; float
      ``F`` in [0, 1] is multiplied by 255, otherwise min-max stretched.
    - Animated images give their first frame.
    - Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) is enforced as an
      error (Pillow itself only warns between 1x and 2x the limit) before any pixel is decoded.
    - Truncated files are errors: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is not touched (it must be
      False, Pillow's default) and the pixels are decoded inside the error handling.
    """
    path = Path(path)
    item_id = str(path) if item_id is None else item_id
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageDecodeError(item_id, f"cannot read {path}: {exc.strerror or exc}", type(exc).__name__) from None
    if size == 0:
        raise ImageDecodeError(item_id, f"empty file (0 bytes): {path}")
    try:
        with Image.open(path) as img:
            limit = Image.MAX_IMAGE_PIXELS
            width, height = img.size
            if limit is not None and width * height > limit:
                raise Image.DecompressionBombError(
                    f"{width}x{height} = {width * height} pixels, over the limit of {limit}"
                )
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            img.load()
            return _to_rgb(_apply_exif_orientation(img))
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(
            item_id,
            f"image too large for the decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS): {exc}",
            "DecompressionBombError",
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(item_id, f"not a recognised image format: {path}", "UnidentifiedImageError") from None
    # any decoder failure (OSError, SyntaxError, ValueError, ...) is this item's error
    except Exception as exc:  # noqa: BLE001
        raise ImageDecodeError(
            item_id, f"truncated or corrupt image data ({type(exc).__name__}: {exc})", type(exc).__name__
        ) from None


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - malformed EXIF: the pixels are still valid, keep them as stored
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode.startswith("I;16"):
        values = np.asarray(img).astype(np.uint32)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(img), mode), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    values = values.astype(np.float64)
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if mode == "I" and lo >= 0 and hi <= 65535:
        scaled = values / 257.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        scaled = values * 255.0
    elif hi > lo:
        scaled = (values - lo) / (hi - lo) * 255.0
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.nan_to_num(np.rint(scaled)), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- Broden


@dataclass(frozen=True)
class BrodenItem:
    """One probe image with its pixel masks (per category) and image-level labels.

    ``masks[cat]`` is int32 ``[k, sh, sw]``: label numbers (``label.csv``), one plane per
    segmentation PNG listed for that category, 0 = unlabelled. ``image_labels[cat]`` lists the
    label numbers given for the whole image (scene, texture).
    """

    image_id: str
    path: Path
    height: int
    width: int
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    image_labels: dict[str, list[int]] = field(default_factory=dict)


_INDEX_FIXED = ("image", "split", "ih", "iw", "sh", "sw")
_CATEGORY_COUNT = re.compile(r"^\s*([^()]+?)\s*(?:\((\d+)\))?\s*$")


def decode_label_mask(rgb: np.ndarray) -> np.ndarray:
    """Label numbers of a Broden segmentation image: ``R + 256 * G`` as int32."""
    rgb = np.asarray(rgb)
    return rgb[..., 0].astype(np.int32) + 256 * rgb[..., 1].astype(np.int32)


class BrodenProbeSet:
    """A probe set in Broden's on-disk format (real ``broden1_224`` or the synthetic world).

    Layout: ``index.csv`` (``image, split, ih, iw, sh, sw`` then one column per category),
    ``label.csv`` (``number, name, category, ...`` with ``category`` like ``object(12);part(3)``),
    optional ``c_<category>.csv`` (``code, number, name, ...``) and ``images/`` holding the images
    and segmentation PNGs the index names. A category cell holds ``;``-separated PNG names
    (pixel labels, label = R + 256·G) or ``;``-separated label numbers (image-level labels).

    Iteration is lazy (pixels are decoded when an item is reached) and yields a
    :class:`BrodenItem` or, for an unusable row, an :class:`ItemError` (missing file, bad
    numbers, undecodable mask, mask of the wrong shape). A mask whose size differs from the
    index's ``(sh, sw)`` is resized to it with nearest-neighbour sampling (labels are never
    blended) when its aspect ratio agrees to within one pixel; otherwise the item is an error,
    since a stretched mask would mislabel pixels. Real Broden masks are half the image's size
    by design (``sh = ih / 2``): consumers compare masks with activations at ``(sh, sw)``.

    A missing or malformed ``index.csv``/``label.csv`` raises :class:`ConfigError` on
    construction (``field`` names the config field of the probe set).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        categories: Sequence[str] | None = None,
        split: str | None = None,
        field: str = "probe_set",
    ) -> None:
        self.root = Path(root)
        self.field = field
        if not self.root.is_dir():
            raise ConfigError(field, f"{self.root} is not a directory")
        self.images_dir = self.root / "images"
        self._images_real = os.path.realpath(self.images_dir)
        header, rows = self._read_index()
        available = self._available_categories(header)
        if categories is None:
            self.categories = available
        else:
            unknown = [c for c in categories if c not in available]
            if unknown:
                raise ConfigError(
                    f"{field}.categories",
                    f"unknown categories {unknown}; this probe set has {', '.join(available) or 'none'}",
                )
            self.categories = list(categories)
        if split is not None:
            splits = sorted({r.get("split", "") for r in rows})
            if split not in splits:
                raise ConfigError(
                    f"{field}.split", f"no rows with split {split!r}; splits present: {', '.join(splits)}"
                )
            rows = [r for r in rows if r.get("split") == split]
        self.split = split
        self._rows = rows
        self.labels = self._read_labels()
        numbers = [int(n) for n in self.labels["number"]]
        self.label_names: dict[int, str] = dict(zip(numbers, self.labels["name"]))
        self.label_category: dict[int, str] = dict(zip(numbers, self.labels["category"]))
        self.category_labels: dict[str, list[int]] = self._read_category_files(available)

    # -- reading the tables

    def _read_csv(self, name: str) -> tuple[list[str], list[dict[str, str]]]:
        path = self.root / name
        if not path.is_file():
            raise ConfigError(self.field, f"{path} is missing; a Broden-format probe set needs index.csv and label.csv")
        try:
            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f)
                header = [h.strip() for h in next(reader, [])]
                rows = [dict(zip(header, (v.strip() for v in values))) for values in reader if values]
        except (UnicodeDecodeError, csv.Error) as exc:
            raise ConfigError(self.field, f"{path} is not a readable UTF-8 CSV file: {exc}") from None
        return header, rows

    def _read_index(self) -> tuple[list[str], list[dict[str, str]]]:
        header, rows = self._read_csv("index.csv")
        if "image" not in header:
            raise ConfigError(self.field, f"{self.root / 'index.csv'} has no 'image' column (header: {header})")
        if len(set(header)) != len(header):
            raise ConfigError(self.field, f"{self.root / 'index.csv'} repeats a column (header: {header})")
        return header, rows

    def _available_categories(self, header: list[str]) -> list[str]:
        return [c for c in header if c and c not in _INDEX_FIXED]

    def _read_labels(self) -> pd.DataFrame:
        header, rows = self._read_csv("label.csv")
        if "number" not in header or "name" not in header:
            raise ConfigError(
                self.field, f"{self.root / 'label.csv'} needs 'number' and 'name' columns (header: {header})"
            )
        records = []
        for row in rows:
            try:
                number = int(row.get("number", ""))
            except ValueError:
                raise ConfigError(
                    self.field, f"label.csv: label number {row.get('number')!r} is not an integer"
                ) from None
            records.append(
                {"number": number, "name": row.get("name", ""), "category": _main_category(row.get("category", ""))}
            )
        return pd.DataFrame(records, columns=["number", "name", "category"])

    def _read_category_files(self, available: list[str]) -> dict[str, list[int]]:
        """Label numbers of each category, from ``c_<category>.csv`` or else ``label.csv``."""
        result: dict[str, list[int]] = {}
        for cat in available:
            path = self.root / f"c_{cat}.csv"
            if re.fullmatch(r"[\w-]{1,100}", cat) and path.is_file():
                _, rows = self._read_csv(path.name)
                try:
                    result[cat] = sorted(int(r["number"]) for r in rows if r.get("number", "") != "")
                except ValueError:
                    raise ConfigError(self.field, f"{path}: a label number is not an integer") from None
            else:
                result[cat] = sorted(n for n, c in self.label_category.items() if c == cat)
        return result

    # -- items

    def __len__(self) -> int:
        return len(self._rows)

    def index_rows(self) -> Iterator[dict[str, str]]:
        """The selected ``index.csv`` rows as dicts of strings (no file is opened)."""
        return iter(self._rows)

    def __iter__(self) -> Iterator[BrodenItem | ItemError]:
        for row in self._unique_rows():
            yield row if isinstance(row, ItemError) else self._item(row)

    def image_records(self) -> Iterator[ImageRecord | ItemError]:
        """The selected images as image-set records, paths checked, no pixels read."""
        for row in self._unique_rows():
            if isinstance(row, ItemError):
                yield row
                continue
            try:
                yield ImageRecord(row["image"], _join_under(self._images_real, row["image"], row["image"]))
            except ItemError as exc:
                yield exc

    def _unique_rows(self) -> Iterator[dict[str, str] | ItemError]:
        seen: set[str] = set()
        for row in self._rows:
            image_id = row.get("image", "")
            if not image_id:
                yield ItemError("index.csv", "row without an image name")
            elif image_id in seen:
                yield ItemError(image_id, "duplicate id (an earlier index.csv row names the same image)", "DuplicateId")
            else:
                seen.add(image_id)
                yield row

    def _item(self, row: dict[str, str]) -> BrodenItem | ItemError:
        image_id = row["image"]
        try:
            path = _join_under(self._images_real, image_id, image_id)
            if not path.is_file():
                raise ItemError(image_id, f"image file listed in index.csv is missing: {path}", "FileNotFoundError")
            if row.get("ih") and row.get("iw"):
                height, width = _positive_int(row, "ih", image_id), _positive_int(row, "iw", image_id)
            else:
                height, width = _image_size(path, image_id)
            sh = _positive_int(row, "sh", image_id, default=height)
            sw = _positive_int(row, "sw", image_id, default=width)
            masks: dict[str, np.ndarray] = {}
            image_labels: dict[str, list[int]] = {}
            for cat in self.categories:
                parts = [p.strip() for p in row.get(cat, "").split(";") if p.strip()]
                if not parts:
                    continue
                if all(p.lower().endswith(".png") for p in parts):
                    masks[cat] = np.stack([self._mask(p, image_id, sh, sw) for p in parts])
                elif all(re.fullmatch(r"\d+", p) for p in parts):
                    image_labels[cat] = [int(p) for p in parts]
                else:
                    raise ItemError(
                        image_id,
                        f"category {cat!r}: cell {row.get(cat)!r} mixes or holds neither PNG names nor label numbers",
                    )
        except ItemError as exc:
            return exc
        except OSError as exc:
            return ItemError(image_id, f"cannot read files of this row: {exc}", type(exc).__name__)
        return BrodenItem(image_id, path, height, width, masks, image_labels)

    def _mask(self, name: str, image_id: str, sh: int, sw: int) -> np.ndarray:
        path = _join_under(self._images_real, name, image_id)
        if not path.is_file():
            raise ItemError(image_id, f"segmentation file listed in index.csv is missing: {path}", "FileNotFoundError")
        try:
            with Image.open(path) as img:
                img.load()
                rgb = np.asarray(img.convert("RGB"))
        except Exception as exc:  # noqa: BLE001 - any decoder failure makes this item unusable
            raise ImageDecodeError(
                image_id, f"cannot decode segmentation {name}: {type(exc).__name__}: {exc}"
            ) from None
        labels = decode_label_mask(rgb)
        h, w = labels.shape
        if (h, w) != (sh, sw):
            if abs(h * sw - w * sh) > max(sh, sw):
                raise ItemError(
                    image_id,
                    f"segmentation {name} is {w}x{h} but index.csv says {sw}x{sh} with a different aspect ratio",
                    "MaskSizeError",
                )
            ys = (np.arange(sh) * h // sh)[:, None]
            xs = (np.arange(sw) * w // sw)[None, :]
            labels = labels[ys, xs]
        return labels

    def load_image(self, item: BrodenItem) -> Image.Image:
        """The item's RGB image (see :func:`load_rgb`); raises :class:`ImageDecodeError`."""
        return load_rgb(item.path, item_id=item.image_id)


def _image_size(path: Path, image_id: str) -> tuple[int, int]:
    """(height, width) from the image header, for index files without ``ih``/``iw``."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except Exception as exc:  # noqa: BLE001 - any header failure makes this item unusable
        raise ImageDecodeError(image_id, f"cannot read image size: {type(exc).__name__}: {exc}") from None
    return height, width


def _positive_int(row: dict[str, str], key: str, image_id: str, default: int | None = None) -> int:
    raw = row.get(key, "")
    if raw == "" and default is not None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ItemError(image_id, f"index.csv column {key!r} must be a positive integer, got {raw!r}") from None
    if value <= 0:
        raise ItemError(image_id, f"index.csv column {key!r} must be a positive integer, got {value}")
    return value


def _main_category(cell: str) -> str:
    """The category a label mostly belongs to: ``object(120);part(3)`` -> ``object``."""
    best, best_count = "", -1
    for part in cell.split(";"):
        match = _CATEGORY_COUNT.match(part)
        if not match or not match.group(1):
            continue
        count = int(match.group(2) or 0)
        if count > best_count:
            best, best_count = match.group(1), count
    return best
