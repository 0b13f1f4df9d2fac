"""Helpers of the bad-input matrix: a small image folder and a tiny audit config file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

N_IMAGES = 4


def write_images(folder: Path, count: int = N_IMAGES, size: int = 32) -> list[str]:
    """``count`` random RGB PNGs in ``folder``; returns their ids."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{index}.png")
    return [f"img{index}.png" for index in range(count)]


def tiny_audit(images: str, **overrides) -> dict:
    """A config dict: the tiny ResNet explained with Grad-CAM over an image folder, no dissect."""
    data = {
        "name": "robust",
        "models": [
            {
                "name": "tiny",
                "source": "python",
                "callable": "tests.fixtures.tiny_models:tiny_resnet",
                "num_classes": 3,
                "preprocess": {"resize": 32, "crop": 32},
            }
        ],
        "images": {"kind": "folder", "root": images},
        "dissect": {"enabled": False},
        "explain": {"methods": ["gradcam"], "chunk_size": 2, "batch_size": 2, "metrics": {"steps": 2}},
    }
    data.update(overrides)
    return data


def write_config(folder: Path, data: dict, name: str = "config.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
