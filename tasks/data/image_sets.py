"""The configured image set, listed once per run into the ``images`` table (what explain tasks read).

Listing is lazy end to end: folders, lists and Broden indexes are streamed, and the usable records
go to the ``images`` table one explain chunk at a time, so a set of any size costs one chunk of
memory and the flow hands its tasks chunk numbers, not records. Unusable entries (path escapes,
duplicates, missing files) become ``errors`` rows of stage ``list`` and the run goes on with the rest.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from xai_audit.storage.parquet import ResultsStore
from xai_audit.tasks.core.callables import load_callable
from xai_audit.tasks.core.config import AuditConfig
from xai_audit.tasks.core.errors import ConfigError, ItemError
from xai_audit.tasks.data.images import BrodenProbeSet, ImageRecord, iter_image_folder, iter_image_list


def _world_records(config: AuditConfig) -> Iterator[ImageRecord]:
    from xai_audit.tasks.world.synthetic import ensure_world, read_attributes

    root = ensure_world(config.world)
    for row in read_attributes(root, config.images.split):
        stem = row["image"].removesuffix(".png")
        yield ImageRecord(
            image_id=row["image"],
            path=root / "images" / row["image"],
            label_name=row["object"],
            mask_path=root / "images" / f"{stem}_object.png",
        )


def written_list(target: str) -> Path:
    """The list file the ``python`` kind's callable returns (it may write the images first)."""
    write_list = load_callable(target, "images.callable")
    try:
        list_file = Path(write_list())
    except Exception as exc:  # the user's code failing is a problem with this field
        raise ConfigError("images.callable", f"calling {target!r} raised {type(exc).__name__}: {exc}") from exc
    if not list_file.is_file():
        raise ConfigError("images.callable", f"{target!r} returned {list_file}, which is not a list file")
    return list_file


def iter_image_set(config: AuditConfig) -> Iterator[ImageRecord | ItemError]:
    """Records (or item errors) of the configured image set, in a deterministic order."""
    images = config.images
    if images.kind == "world":
        items = _world_records(config)
    elif images.kind == "folder":
        items = iter_image_folder(images.root)
    elif images.kind == "list":
        items = iter_image_list(images.list_file, images.root)
    elif images.kind == "python":
        list_file = written_list(images.callable or "")
        items = iter_image_list(list_file, images.root or list_file.parent)
    else:
        items = BrodenProbeSet(images.root, split=images.split, field="images.root").image_records()
    return islice(items, images.limit) if images.limit else items


def record_row(record: ImageRecord) -> dict:
    """A record as the plain dict a Prefect task receives."""
    return {
        "image_id": record.image_id,
        "path": str(record.path),
        "label": record.label,
        "label_name": record.label_name,
        "mask_path": str(record.mask_path) if record.mask_path else None,
        "box": list(record.box) if record.box else None,
    }


def image_chunk_unit(chunk: int) -> str:
    """The ``images`` file of one explain chunk."""
    return f"chunk-{chunk:06d}"


def list_image_set(config: AuditConfig, store: ResultsStore, run_id: str) -> int:
    """Write the usable records to ``images``, ``explain.chunk_size`` per file, and the unusable
    ones to ``errors``; returns the number of chunks. Listing again gives the same files."""
    chunk_size, chunks, pending, errors = config.explain.chunk_size, 0, [], []

    def flush() -> None:
        nonlocal chunks, pending
        store.write("images", run_id, image_chunk_unit(chunks), [{**row, "chunk": chunks} for row in pending])
        chunks, pending = chunks + 1, []

    for item in iter_image_set(config):
        if isinstance(item, ItemError):
            errors.append(
                {"stage": "list", "item_id": item.item_id, "error_type": item.error_type, "message": item.message}
            )
            continue
        pending.append(record_row(item))
        if len(pending) == chunk_size:
            flush()
    if pending:
        flush()
    store.write("errors", run_id, "list", errors)
    return chunks


def read_image_chunk(store: ResultsStore, run_id: str, chunk: int) -> list[dict]:
    """The records of one explain chunk, as :func:`list_image_set` wrote them."""
    return [
        {key: value for key, value in row.items() if key != "chunk"}
        for row in store.read_unit("images", run_id, image_chunk_unit(chunk))
    ]
