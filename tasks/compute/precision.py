"""Mixed precision: the config's precision names and the autocast context every forward runs under."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``explain.precision`` -> autocast dtype (None: plain float32)."""


def autocast_context(device: torch.device | str, dtype: torch.dtype | None):
    """Autocast on ``device`` with ``dtype`` (bf16/fp16), or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
