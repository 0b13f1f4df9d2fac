"""The image cases of the bad-input matrix: every file decodes to correct RGB or is one item error."""

from __future__ import annotations

import io
import os
import pathlib
import struct
import tempfile
import tracemalloc
import weakref
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from xai_audit.tasks.core.errors import ConfigError, ImageDecodeError, ItemError, PathEscapeError
from xai_audit.tasks.data import images
from xai_audit.tasks.data.images import ImageRecord, iter_image_folder, iter_image_list, load_rgb


def _pixel(img: Image.Image, xy) -> tuple[int, int, int]:
    return tuple(int(v) for v in img.getpixel(xy))


def _close(a, b, tol=6) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


# --------------------------------------------------------------------------- unusable files


def test_zero_byte_file_is_an_item_error(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match=r"empty file \(0 bytes\)") as info:
        load_rgb(tmp_path / "empty.jpg", item_id="empty.jpg")
    assert isinstance(info.value, ItemError) and info.value.item_id == "empty.jpg"


def test_text_named_jpg_is_an_item_error(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not a JPEG, just some text\n" * 10)
    with pytest.raises(ImageDecodeError, match="not a recognised image format") as info:
        load_rgb(tmp_path / "notes.jpg", item_id="notes.jpg")
    assert info.value.error_type == "UnidentifiedImageError"


def test_truncated_jpeg_is_an_item_error_not_a_grey_image(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # importing the project must not relax it
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    (tmp_path / "cut.jpg").write_bytes(data[: int(len(data) * 0.6)])
    # Pillow opens the header fine; only decoding the pixels reveals the truncation
    with Image.open(tmp_path / "cut.jpg") as img:
        assert img.size == (128, 128)
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        load_rgb(tmp_path / "cut.jpg")


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM"])
def test_truncated_file_of_any_common_format_is_an_item_error(tmp_path, fmt):
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, fmt)
    data = buffer.getvalue()
    (tmp_path / "cut.img").write_bytes(data[: int(len(data) * 0.9)])
    with pytest.raises(ImageDecodeError):
        load_rgb(tmp_path / "cut.img")
    (tmp_path / "whole.img").write_bytes(data)
    whole = np.asarray(load_rgb(tmp_path / "whole.img"))
    assert whole.shape == (64, 64, 3)
    if fmt not in ("GIF", "WEBP"):  # those two are lossy (256-colour palette, lossy WebP by default)
        assert np.array_equal(whole, noise)


def _png_header_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def test_png_claiming_50000_squared_pixels_is_refused_without_allocating_it(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_claiming(50_000, 50_000))
    assert len(path.read_bytes()) < 200
    tracemalloc.start()
    try:
        with pytest.raises(ImageDecodeError, match="decompression-bomb") as info:
            load_rgb(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000  # 7.5 GB of pixels were never allocated
    assert "2500000000" in str(info.value) and info.value.error_type == "DecompressionBombError"


def test_limit_is_an_error_even_where_pillow_only_warns(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (12, 12)).save(tmp_path / "big.png")  # 144 px: over 1x, under 2x the limit
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(tmp_path / "big.png").close()
    with pytest.raises(ImageDecodeError, match="decompression-bomb"), pytest.warns(Image.DecompressionBombWarning):
        load_rgb(tmp_path / "big.png")


def test_missing_file_is_an_item_error(tmp_path):
    with pytest.raises(ImageDecodeError, match="cannot read") as info:
        load_rgb(tmp_path / "gone.png", item_id="gone.png")
    assert info.value.error_type == "FileNotFoundError"


# --------------------------------------------------------------------------- modes that must become RGB


def test_one_by_one_image_is_valid(tmp_path):
    Image.new("RGB", (1, 1), (12, 34, 56)).save(tmp_path / "dot.png")
    img = load_rgb(tmp_path / "dot.png")
    assert (img.mode, img.size, _pixel(img, (0, 0))) == ("RGB", (1, 1), (12, 34, 56))


def test_grayscale_becomes_equal_rgb_channels(tmp_path):
    Image.new("L", (3, 2), 77).save(tmp_path / "g.png")
    img = load_rgb(tmp_path / "g.png")
    assert (img.mode, _pixel(img, (2, 1))) == ("RGB", (77, 77, 77))


def test_palette_image_uses_its_palette_and_transparency_shows_the_background(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 10, 200, 30, 250, 5, 5] + [0] * (253 * 3))
    img.putpixel((0, 0), 1)
    img.putpixel((1, 0), 2)
    img.save(tmp_path / "p.png")
    img.save(tmp_path / "pt.png", transparency=2)
    opaque, transparent = load_rgb(tmp_path / "p.png"), load_rgb(tmp_path / "pt.png")
    assert _pixel(opaque, (0, 0)) == (10, 200, 30) and _pixel(opaque, (1, 0)) == (250, 5, 5)
    assert _pixel(transparent, (0, 0)) == (10, 200, 30)
    assert _pixel(transparent, (1, 0)) == images.ALPHA_BACKGROUND


def test_rgba_is_composited_on_the_documented_background(tmp_path):
    img = Image.new("RGBA", (3, 1))
    img.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (0, 0, 255, 128)])
    img.save(tmp_path / "a.png")
    out = load_rgb(tmp_path / "a.png")
    assert images.ALPHA_BACKGROUND == (255, 255, 255)
    assert _pixel(out, (0, 0)) == (255, 255, 255)  # fully transparent red: not red
    assert _pixel(out, (1, 0)) == (255, 0, 0)
    assert _close(_pixel(out, (2, 0)), (127, 127, 255), tol=2)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    with Image.open(tmp_path / "c.jpg") as raw:
        assert raw.mode == "CMYK"
    out = load_rgb(tmp_path / "c.jpg")
    assert out.mode == "RGB" and _close(_pixel(out, (4, 4)), (255, 0, 0), tol=10)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 25700, 32896, 65535]], dtype=np.uint16)  # 0, 100*257, 128*257, max
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode == "I;16"
    out = np.asarray(load_rgb(tmp_path / "deep.png"))
    assert out.dtype == np.uint8 and out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 100, 128, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_animated_gif_gives_its_first_frame(tmp_path):
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (253 * 3)
    frames = []
    for index in (1, 2):
        frame = Image.new("P", (6, 6), index)
        frame.putpalette(palette)
        frames.append(frame)
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(tmp_path / "anim.gif") as raw:
        assert raw.n_frames == 2
        raw.seek(1)  # even a handle left on a later frame must not leak into the result
    assert _pixel(load_rgb(tmp_path / "anim.gif"), (3, 3)) == (255, 0, 0)


def test_exif_orientation_6_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # red top-left corner as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = load_rgb(tmp_path / "rot.jpg")
    assert out.size == (20, 40)
    assert _close(_pixel(out, (15, 5)), (255, 0, 0), tol=12)  # the corner is now top-right
    assert _close(_pixel(out, (5, 5)), (0, 0, 255), tol=12)


def test_filename_with_spaces_and_non_ascii_characters(tmp_path):
    name = "holiday photo – Zürich 東京 #1.png"
    Image.new("RGB", (2, 2), (1, 2, 3)).save(tmp_path / name)
    (tmp_path / "list.txt").write_text(f"{name}\n", encoding="utf-8")
    (listed,) = list(iter_image_list(tmp_path / "list.txt", tmp_path))
    (walked,) = list(iter_image_folder(tmp_path))
    assert listed.image_id == walked.image_id == name
    assert _pixel(load_rgb(walked.path), (0, 0)) == (1, 2, 3)


# --------------------------------------------------------------------------- paths and ids


@pytest.fixture
def outside_and_root(tmp_path):
    outside = tmp_path / "outside"
    root = tmp_path / "root"
    outside.mkdir()
    root.mkdir()
    Image.new("RGB", (2, 2)).save(outside / "secret.png")
    Image.new("RGB", (2, 2)).save(root / "ok.png")
    Image.new("RGB", (2, 2)).save(root / "ok2.png")
    return outside, root


def test_list_entries_leaving_the_root_are_refused(outside_and_root):
    outside, root = outside_and_root
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "list.csv").write_text(
        f"path,mask\n../outside/secret.png,\n{outside / 'secret.png'},\n"
        "link.png,\nok.png,../outside/secret.png\nok2.png,\n"
    )
    items = list(iter_image_list(root / "list.csv", root))
    assert [type(i) for i in items[:4]] == [PathEscapeError] * 4
    assert [i.item_id for i in items[:4]] == [
        "../outside/secret.png",
        str(outside / "secret.png"),
        "link.png",
        "ok.png",
    ]
    assert "outside the set root" in items[0].message and "absolute" in items[1].message
    assert isinstance(items[4], ImageRecord) and items[4].image_id == "ok2.png"


def test_folder_symlinks_pointing_outside_are_refused_and_the_rest_listed(outside_and_root):
    outside, root = outside_and_root
    (root / "a_link.png").symlink_to(outside / "secret.png")
    (root / "b_dirlink").symlink_to(outside)
    items = list(iter_image_folder(root))
    assert [(type(i).__name__, i.item_id if isinstance(i, ItemError) else i.image_id) for i in items] == [
        ("PathEscapeError", "a_link.png"),
        ("PathEscapeError", "b_dirlink"),
        ("ImageRecord", "ok.png"),
        ("ImageRecord", "ok2.png"),
    ]


def test_duplicate_ids_in_a_list_keep_the_first_and_flag_the_rest(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (2, 2)).save(tmp_path / name)
    (tmp_path / "sub").mkdir()
    (tmp_path / "list.txt").write_text("a.png\n./a.png\nb.png\nsub/../a.png\na.png\n")
    items = list(iter_image_list(tmp_path / "list.txt", tmp_path))
    assert [type(i).__name__ for i in items] == ["ImageRecord", "ItemError", "ImageRecord", "ItemError", "ItemError"]
    assert {i.item_id for i in items if isinstance(i, ItemError)} == {"a.png"}
    assert all(i.error_type == "DuplicateId" for i in items if isinstance(i, ItemError))


# --------------------------------------------------------------------------- scale


def test_folder_listing_reads_directories_only_as_it_advances(tmp_path, monkeypatch):
    for d in range(30):
        (tmp_path / f"d{d:02d}").mkdir()
        (tmp_path / f"d{d:02d}" / "x.png").write_bytes(b"")
    scanned: list[str] = []
    real_scandir = os.scandir

    def counting_scandir(path):
        scanned.append(str(path))
        return real_scandir(path)

    monkeypatch.setattr(images.os, "scandir", counting_scandir)
    items = iter_image_folder(tmp_path)
    first = next(items)
    assert first.image_id == "d00/x.png"
    assert len(scanned) == 2  # the root and the first folder, not all 31 directories
    assert sum(1 for _ in items) == 29


def _traced_bytes() -> int:
    """Bytes held now, leaving out pathlib: Python 3.11's pathlib interns every path part, and
    the interpreter-wide interning table grows in one-off multi-MB steps that are not ours."""
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, pathlib.__file__)])
    return sum(stat.size for stat in snapshot.statistics("filename"))


@pytest.fixture
def many_files_dir(tmp_path):
    """A folder for 20k files: on tmpfs when there is one (creating them on disk takes ~10 s)."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="xai-audit-test-") as folder:
            yield Path(folder)
    else:
        yield tmp_path


def test_listing_20k_files_keeps_memory_flat(many_files_dir):
    tmp_path = many_files_dir
    for d in range(100):
        folder = f"{tmp_path}/class{d:03d}"
        os.mkdir(folder)
        for i in range(200):
            os.close(os.open(f"{folder}/img{i:04d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
    tracemalloc.start()
    try:
        before = _traced_bytes()
        samples = []
        for index, _item in enumerate(iter_image_folder(tmp_path)):
            if index % 2500 == 0:
                samples.append(_traced_bytes() - before)
        start = _traced_bytes()
        held = list(iter_image_folder(tmp_path))
        holding = _traced_bytes() - start
    finally:
        tracemalloc.stop()
    assert len(samples) == 8 and len(held) == 20_000
    assert max(samples) < 200_000  # bytes, from the 1st to the 17,501st item: a directory at a time
    assert holding > 2_000_000  # what keeping every record would cost, for scale


def test_listing_a_20k_line_list_keeps_no_record_alive(tmp_path):
    (tmp_path / "list.txt").write_text("".join(f"img{i:05d}.jpg\n" for i in range(20_000)))
    items = iter_image_list(tmp_path / "list.txt", tmp_path)
    refs = [weakref.ref(next(items)) for _ in range(10_000)]  # each record dropped once counted
    # halfway through, the generator holds none of them (only the set of ids seen, for
    # duplicates); a list built up front would still hold all 20k
    assert sum(ref() is not None for ref in refs) == 0
    assert sum(1 for _ in items) == 10_000


# --------------------------------------------------------------------------- fuzz


def _valid_image_bytes() -> list[bytes]:
    out = []
    for fmt, mode in (("PNG", "RGBA"), ("JPEG", "RGB"), ("GIF", "P"), ("BMP", "RGB"), ("TIFF", "CMYK")):
        buffer = io.BytesIO()
        Image.new(mode, (5, 4)).save(buffer, fmt)
        out.append(buffer.getvalue())
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about corrupt TIFF tags it skips
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(_valid_image_bytes()),
    cut=st.integers(min_value=0, max_value=400),
    flips=st.lists(
        st.tuples(st.integers(min_value=0, max_value=400), st.integers(min_value=0, max_value=255)), max_size=6
    ),
)
def test_any_corrupted_image_decodes_to_rgb_or_is_an_item_error(base, cut, flips):
    data = bytearray(base[: max(cut, 1)] if cut < len(base) else base)
    for position, value in flips:
        if position < len(data):
            data[position] = value
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.img"
        path.write_bytes(bytes(data))
        try:
            img = load_rgb(path)
        except ImageDecodeError:
            return
        assert img.mode == "RGB" and img.width >= 1 and img.height >= 1


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["list.csv", "list.txt"]))
def test_any_list_file_lists_or_raises_only_project_errors(content, name):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / name).write_bytes(content)
        try:
            items = list(iter_image_list(root / name, root))
        except ConfigError:
            return
        assert all(isinstance(i, (ImageRecord, ItemError)) for i in items)
