"""Image sets: folder and list listing, ids, labels, masks and boxes."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from PIL import Image

from xai_audit.tasks.core.errors import ConfigError, ItemError, PathEscapeError
from xai_audit.tasks.data.images import ImageRecord, iter_image_folder, iter_image_list, load_rgb, safe_join


def _png(path: Path, color=(255, 0, 0), size=(4, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _records(items) -> list[ImageRecord]:
    items = list(items)
    assert all(isinstance(i, ImageRecord) for i in items), [i for i in items if not isinstance(i, ImageRecord)]
    return items


# --------------------------------------------------------------------------- folders


def test_folder_with_class_subfolders_labels_like_imagefolder(tmp_path):
    for rel in ["dog/b.png", "cat/a.png", "dog/sub/c.JPG", "cat/.hidden.png", "bird/z.png"]:
        _png(tmp_path / rel)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    records = _records(iter_image_folder(tmp_path))
    assert [r.image_id for r in records] == ["bird/z.png", "cat/a.png", "dog/b.png", "dog/sub/c.JPG"]
    assert [(r.label_name, r.label) for r in records] == [("bird", 0), ("cat", 1), ("dog", 2), ("dog", 2)]
    assert records[2].path == (tmp_path / "dog" / "b.png").resolve()


def test_folder_class_names_map_folders_to_given_indices(tmp_path):
    for rel in ["dog/b.png", "cat/a.png", "fox/f.png"]:
        _png(tmp_path / rel)
    records = _records(iter_image_folder(tmp_path, class_names=["dog", "cat"]))
    assert [(r.label_name, r.label) for r in records] == [("cat", 1), ("dog", 0), ("fox", None)]


def test_folder_with_images_at_the_root_has_no_labels(tmp_path):
    for rel in ["top.png", "dog/b.png", "dog/deeper/c.png"]:
        _png(tmp_path / rel)
    records = _records(iter_image_folder(tmp_path))
    assert [r.image_id for r in records] == ["dog/b.png", "dog/deeper/c.png", "top.png"]
    assert all(r.label is None and r.label_name is None for r in records)


def test_folder_listing_is_deterministic_and_a_generator(tmp_path):
    names = ["b/2.png", "a/10.png", "a/9.png", "c.png", "a/x/1.png"]
    for rel in names:
        _png(tmp_path / rel)
    items = iter_image_folder(tmp_path)
    assert inspect.isgenerator(items)
    first = [r.image_id for r in items]
    assert first == sorted(first) == ["a/10.png", "a/9.png", "a/x/1.png", "b/2.png", "c.png"]
    assert first == [r.image_id for r in iter_image_folder(tmp_path)]


def test_folder_missing_root_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        iter_image_folder(tmp_path / "nope")
    assert info.value.field == "images.root"


def test_symlink_inside_root_is_followed_under_its_own_id(tmp_path):
    _png(tmp_path / "real" / "a.png")
    (tmp_path / "alias.png").symlink_to(tmp_path / "real" / "a.png")
    ids = [r.image_id for r in _records(iter_image_folder(tmp_path))]
    assert ids == ["alias.png", "real/a.png"]


def test_symlinked_directories_inside_root_are_not_walked_twice(tmp_path):
    _png(tmp_path / "d" / "a.png")
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d")  # a cycle
    (tmp_path / "c_alias").symlink_to(tmp_path / "d")  # sorts before its target
    assert [r.image_id for r in _records(iter_image_folder(tmp_path))] == ["d/a.png"]


# --------------------------------------------------------------------------- lists


def test_csv_list_with_labels_masks_and_boxes(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "b, with comma.png")
    _png(tmp_path / "masks" / "a.png")
    (tmp_path / "list.csv").write_text(
        'path,label,mask,x0,y0,x1,y1\nimgs/a.png,2,masks/a.png,1,2,3,4\n"imgs/b, with comma.png",dog,,,,,\n'
    )
    records = _records(iter_image_list(tmp_path / "list.csv", tmp_path, class_names=["cat", "bird", "fox", "dog"]))
    a, b = records
    assert (a.image_id, a.label, a.label_name, a.box) == ("imgs/a.png", 2, None, (1, 2, 3, 4))
    assert a.mask_path == (tmp_path / "masks" / "a.png").resolve()
    assert (b.image_id, b.label, b.label_name, b.mask_path, b.box) == ("imgs/b, with comma.png", 3, "dog", None, None)


def test_text_list_skips_blank_and_comment_lines_and_defaults_root_to_its_folder(tmp_path):
    _png(tmp_path / "x.png")
    _png(tmp_path / "sub" / "y.png")
    (tmp_path / "list.txt").write_text("# my images\n\nx.png\n  sub/./y.png  \n")
    records = _records(iter_image_list(tmp_path / "list.txt"))
    assert [r.image_id for r in records] == ["x.png", "sub/y.png"]
    assert load_rgb(records[1].path).size == (4, 4)


def test_bad_rows_become_item_errors_and_the_list_goes_on(tmp_path):
    for name in "abcdef":
        _png(tmp_path / f"{name}.png")
    (tmp_path / "list.csv").write_bytes(
        b"path,label,x0,y0,x1,y1\n"
        b"a.png,1,5,5,2,2\n"  # box corners reversed
        b"b.png,not-a-class,,,,\n"  # name not in class_names
        b"c.png,7,,,,\n"  # index out of range
        b"d\xff.png,0,,,,\n"  # not UTF-8
        b"e.png,0\n"  # wrong field count
        b"f.png,1,0,0,2,2\n"
    )
    items = list(iter_image_list(tmp_path / "list.csv", tmp_path, class_names=["a", "b"]))
    assert [type(i).__name__ for i in items] == ["ItemError"] * 5 + ["ImageRecord"]
    assert [i.item_id for i in items[:5]] == ["a.png", "b.png", "c.png", "list.csv:5", "list.csv:6"]
    assert "x0 < x1" in items[0].message and "not-a-class" in items[1].message
    assert items[3].error_type == "UnicodeDecodeError"
    assert items[5].box == (0, 0, 2, 2)


@pytest.mark.parametrize(
    "header, problem",
    [("file,label", "must name 'path'"), ("path,label,colour", "unknown: colour"), ("path,x0,y0", "needs all of x0")],
)
def test_bad_csv_header_is_a_config_error(tmp_path, header, problem):
    (tmp_path / "list.csv").write_text(header + "\n")
    with pytest.raises(ConfigError, match=problem) as info:
        iter_image_list(tmp_path / "list.csv", tmp_path)
    assert info.value.field == "images.list_file"


def test_safe_join_accepts_inner_dotdot_and_refuses_escapes(tmp_path):
    assert safe_join(tmp_path, "a/../b.png") == (tmp_path / "b.png").resolve()
    for bad in ["../b.png", "/etc/passwd", "a/../../b.png"]:
        with pytest.raises(PathEscapeError) as info:
            safe_join(tmp_path, bad)
        assert isinstance(info.value, ItemError) and info.value.item_id == bad
