"""How saliency maps are stored in the ``saliency`` table: row-major float16 bytes plus the shape."""

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
