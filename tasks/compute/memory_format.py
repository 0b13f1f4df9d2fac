"""Channels-last weights for AblationCAM's ablated forwards.

(LIME, ScoreCAM and the metrics use :mod:`xai_audit.tasks.compute.inference`.)

On CPUs, convolutions whose weights AND inputs are channels-last run ~1.5-2x faster than NCHW
at 224 px (oneDNN's native layout); converting only the input gains little, because the
weights decide the kernel. The conversion is scoped to the forwards that dominate those
methods and undone afterwards, so the (shared, cached) model keeps its layout for everything
else: hooks and ``.view`` calls elsewhere see the tensors they always saw.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def channels_last_weights(model: object) -> Iterator[None]:
    """Within the block, ``model``'s 4-D parameters are channels-last (no-op for non-modules).

    Values are unchanged; only strides move. Parameters keep their identity (``.data`` is
    swapped) and get their original storage back afterwards, so optimisers, hooks and the
    cached inference copy (:mod:`xai_audit.tasks.compute.inference`, keyed by storage) are unaffected.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    converted = [
        (p, p.data)
        for p in model.parameters()
        if p.dim() == 4 and p.is_contiguous() and not p.is_contiguous(memory_format=torch.channels_last)
    ]
    for parameter, original in converted:
        parameter.data = original.contiguous(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for parameter, original in converted:
            parameter.data = original
