"""The image set is listed once per run into the ``images`` table, one file per explain chunk."""

from __future__ import annotations

import numpy as np
from PIL import Image

from xai_audit.storage.parquet import ResultsStore
from xai_audit.tasks.core.config import parse_config
from xai_audit.tasks.data.image_sets import (
    image_chunk_unit,
    iter_image_set,
    list_image_set,
    read_image_chunk,
    record_row,
)


def _folder(root, names):
    root.mkdir()
    for name in names:
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(root / name)


def test_chunks_hold_the_listing_in_order(tmp_path):
    _folder(tmp_path / "images", [f"{index:02d}.png" for index in range(7)])
    config = parse_config(
        {"images": {"kind": "folder", "root": str(tmp_path / "images")}, "explain": {"chunk_size": 3}}
    )
    store = ResultsStore(str(tmp_path / "results"))

    n_chunks = list_image_set(config, store, "r1")

    listed = [record_row(item) for item in iter_image_set(config)]
    chunks = [read_image_chunk(store, "r1", chunk) for chunk in range(n_chunks)]
    assert [len(chunk) for chunk in chunks] == [3, 3, 1]
    assert [record for chunk in chunks for record in chunk] == listed
    assert [row["image_id"] for row in listed] == [f"{index:02d}.png" for index in range(7)]
    table = store.read("images", "r1")
    assert table.groupby("chunk").image_id.count().tolist() == [3, 3, 1] and table.run_id.eq("r1").all()
    assert store.has_unit("images", "r1", image_chunk_unit(2)) and not store.has_unit(
        "images", "r1", image_chunk_unit(3)
    )


def test_listing_again_rewrites_the_same_files(tmp_path):
    _folder(tmp_path / "images", ["a.png", "b.png"])
    config = parse_config(
        {"images": {"kind": "folder", "root": str(tmp_path / "images")}, "explain": {"chunk_size": 1}}
    )
    store = ResultsStore(str(tmp_path / "results"))
    first = (list_image_set(config, store, "r1"), store.read("images", "r1"))
    second = (list_image_set(config, store, "r1"), store.read("images", "r1"))
    assert first[0] == second[0] == 2
    assert first[1].equals(second[1]) and len(store.files("images", "r1")) == 2
