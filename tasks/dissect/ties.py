"""Near-ties between a unit's best labels: reported, never decided silently by rounding.

Two concepts whose scores differ by less than float32 round-off of a long sum (or by less than
the evidence can tell apart) should not be presented as a decision. Every labelling method keeps
its deterministic pick in ``concept`` and lists, in ``tied_with``, the other concepts scoring
within ``tolerance`` of it (absolute, in the method's own score units: IoU for Network
Dissection, the similarity function's value for CLIP-Dissect).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

DEFAULT_TIE_TOLERANCE = 1e-3


def tied_concepts(scores: Tensor, names: Sequence[str], chosen: Tensor, tolerance: float) -> list[list[str]]:
    """Per row of ``scores`` ``[units, concepts]``: the names of the other concepts within
    ``tolerance`` of the chosen column ``chosen[unit]``, best first (column order among equals).
    Non-finite scores never tie."""
    if tolerance < 0:
        raise ValueError(f"tie tolerance must be >= 0, got {tolerance}")
    scores = scores.double().cpu()
    best = scores.gather(1, chosen.long().cpu()[:, None])
    close = torch.isfinite(scores) & (scores >= best - tolerance)
    close.scatter_(1, chosen.long().cpu()[:, None], False)
    out: list[list[str]] = []
    for unit in range(scores.shape[0]):
        columns = close[unit].nonzero().flatten()
        if columns.numel() == 0:
            out.append([])
            continue
        order = torch.sort(scores[unit, columns], descending=True, stable=True).indices
        out.append([names[int(j)] for j in columns[order]])
    return out
