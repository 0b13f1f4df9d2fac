"""How maps are stored: saliency maps as row-major float16 bytes plus the shape, concept heatmaps
(signed, summed to a contribution) as float32."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def encode_map(saliency_map: np.ndarray) -> dict[str, Any]:
    """The ``height``, ``width`` and ``map`` columns for one 2-D map."""
    values = np.asarray(saliency_map, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"a saliency map must be 2-D, got shape {values.shape}")
    return {"height": values.shape[0], "width": values.shape[1], "map": values.astype("<f2").tobytes()}


def decode_map(row: Mapping[str, Any]) -> np.ndarray:
    """The float32 map of a ``saliency`` row (inverse of :func:`encode_map` up to float16 rounding)."""
    values = np.frombuffer(row["map"], dtype="<f2").astype(np.float32)
    return values.reshape(int(row["height"]), int(row["width"]))


def encode_heatmap(heatmap: np.ndarray) -> dict[str, object]:
    """The ``heatmap``, ``heatmap_height`` and ``heatmap_width`` columns (row-major float32, signed)."""
    return {
        "heatmap": heatmap.astype("<f4").tobytes(),
        "heatmap_height": heatmap.shape[0],
        "heatmap_width": heatmap.shape[1],
    }


def decode_heatmap(row: Mapping[str, object]) -> np.ndarray:
    """The float32 heatmap of a ``concept_attribution`` row."""
    values = np.frombuffer(row["heatmap"], dtype="<f4")
    return values.reshape(int(row["heatmap_height"]), int(row["heatmap_width"])).copy()
