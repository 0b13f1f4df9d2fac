"""Out-of-memory back-off: run a batch function over items, halving the batch on OOM."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocator running out of memory (CUDA OOM or a RuntimeError saying so)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def run_with_backoff(
    function: Callable[[Sequence[T]], R],
    items: Sequence[T],
    batch_size: int,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> list[R]:
    """``function`` over consecutive batches of ``items``; on OOM the batch size halves and the
    failed batch is retried, and the smaller size is kept for the rest.

    Raises the OOM error only when a batch of one does not fit.
    """
    results, start, size = [], 0, max(1, batch_size)
    while start < len(items):
        batch = items[start : start + size]
        try:
            results.append(function(batch))
        except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
            if not is_out_of_memory(error) or size == 1:
                raise
            size = max(1, len(batch) // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            (logger or logging.getLogger(__name__)).warning(
                "out of memory on a batch of %d; retrying with batches of %d", len(batch), size
            )
            continue
        start += len(batch)
    return results
