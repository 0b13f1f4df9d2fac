"""The probe set of neuron labelling: which images, their identity for caches, and batch streams.

The usable images are listed once per probe set (every image and mask decoded once; a broken one
becomes an ``errors`` row of stage ``probe``) and cached, so model activations, CLIP features and Network
Dissection passes all see exactly the same images in the same order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from xai_audit.tasks.core.cache import cache_dir
from xai_audit.tasks.core.config import AuditConfig
from xai_audit.tasks.core.errors import ItemError
from xai_audit.tasks.data.images import BrodenProbeSet, load_rgb
from xai_audit.tasks.dissect.netdissect import DissectBatch


@dataclass(frozen=True)
class Probe:
    """The usable probe images: ids (POSIX, relative to the set's images folder) and their files."""

    root: str
    split: str | None
    identity: str
    image_ids: list[str]
    paths: list[str]
    errors: list[dict]

    def broden(self, categories: list[str] | None = None) -> BrodenProbeSet:
        return BrodenProbeSet(self.root, categories=categories, split=self.split, field="dissect.probe.root")


def probe_root(config: AuditConfig) -> Path:
    """The Broden-format folder of the configured probe set (the world is generated on demand)."""
    if config.dissect.probe.kind == "world":
        from xai_audit.tasks.world.synthetic import ensure_world

        return ensure_world(config.world)
    return Path(config.dissect.probe.root)


def _index_digest(root: Path) -> str:
    digest = hashlib.sha256()
    with open(root / "index.csv", "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def open_probe(config: AuditConfig) -> Probe:
    """The configured probe set's usable images, listed and checked once, then cached."""
    settings = config.dissect.probe
    root = probe_root(config)
    identity = hashlib.sha256(
        json.dumps([str(root), _index_digest(root), settings.split, settings.limit]).encode()
    ).hexdigest()[:16]
    listing = cache_dir("probe", identity=identity) / "listing.json"
    if listing.is_file():
        cached = json.loads(listing.read_text())
        return Probe(str(root), settings.split, identity, cached["image_ids"], cached["paths"], cached["errors"])
    items = iter(BrodenProbeSet(root, split=settings.split, field="dissect.probe.root"))
    image_ids, paths, errors = [], [], []
    for item in islice(items, settings.limit) if settings.limit else items:
        try:
            if isinstance(item, ItemError):
                raise item
            load_rgb(item.path, item_id=item.image_id)
            image_ids.append(item.image_id)
            paths.append(str(item.path))
        except ItemError as error:
            errors.append(
                {"stage": "probe", "item_id": error.item_id, "error_type": error.error_type, "message": error.message}
            )
    temp = listing.with_name(f".{listing.name}.tmp")
    temp.write_text(json.dumps({"image_ids": image_ids, "paths": paths, "errors": errors}))
    temp.replace(listing)
    return Probe(str(root), settings.split, identity, image_ids, paths, errors)


class _ProbeImages(Dataset):
    """Probe images through one model's (or CLIP's) preprocessing, for a DataLoader."""

    def __init__(self, probe: Probe, preprocess: Callable) -> None:
        self.probe, self.preprocess = probe, preprocess

    def __len__(self) -> int:
        return len(self.probe.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(load_rgb(self.probe.paths[index], item_id=self.probe.image_ids[index]))


def pixel_batches(probe: Probe, preprocess: Callable, batch_size: int, workers: int = 0) -> DataLoader:
    """Preprocessed probe images in probe order, decoded by ``workers`` processes."""
    return DataLoader(
        _ProbeImages(probe, preprocess),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
    )


def dissect_batches(
    probe: Probe,
    preprocess: Callable,
    module: torch.nn.Module,
    layers: list[str],
    batch_size: int,
    device: torch.device,
    categories: list[str] | None = None,
    workers: int = 0,
    nonfinite: dict[str, None] | None = None,
) -> Iterator[DissectBatch]:
    """Network Dissection batches: each layer's spatial activations with the images' concept masks.

    An image with a NaN or infinite activation in any of ``layers`` is left out of its batch
    (thresholds and IoUs must not see it) and its id is added to ``nonfinite`` (insertion-ordered).
    """
    from xai_audit.tasks.dissect.activations import iter_spatial_activations

    usable = set(probe.image_ids)
    items = (item for item in probe.broden(categories) if not isinstance(item, ItemError) and item.image_id in usable)
    pixels = iter(pixel_batches(probe, preprocess, batch_size, workers))
    activations = iter_spatial_activations(module, layers, pixels, device)
    for acts in activations:
        batch_items = list(islice(items, next(iter(acts.values())).shape[0]))
        keep = torch.stack(
            [torch.isfinite(layer_acts).flatten(1).all(dim=1).cpu() for layer_acts in acts.values()]
        ).all(dim=0)
        if not keep.all():
            for item, kept in zip(batch_items, keep.tolist()):
                if not kept and nonfinite is not None:
                    nonfinite.setdefault(item.image_id, None)
            acts = {layer: layer_acts[keep.to(layer_acts.device)] for layer, layer_acts in acts.items()}
            batch_items = [item for item, kept in zip(batch_items, keep.tolist()) if kept]
            if not batch_items:
                continue
        yield DissectBatch(
            acts=acts,
            masks=[item.masks for item in batch_items],
            image_labels=[item.image_labels for item in batch_items],
            image_ids=[item.image_id for item in batch_items],
        )
