"""Progress of long steps, for people watching a run: bars on a terminal, log lines elsewhere.

Library code reports through the ``xai_audit.tasks.progress`` logger (:func:`step` for a stage starting or
ending, :func:`track` around a long loop). Nothing shows unless the caller attaches a handler
(the CLI does, to stderr); :func:`use_bars` makes :func:`track` draw tqdm bars instead of lines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

log = logging.getLogger("xai_audit.tasks.progress")
LINE_EVERY_S = 10.0  # at most one progress line per loop this often (plus its first and last)
_bars = False
Item = TypeVar("Item")


def use_bars(enabled: bool) -> None:
    """Draw :func:`track` loops as tqdm bars (on a terminal) instead of log lines."""
    global _bars
    _bars = enabled


def step(message: str, *args: object) -> None:
    """One line saying what starts or ended, and how big it is."""
    log.info(message, *args)


def track(items: Iterable[Item], what: str, total: int | None = None, unit: str = "batches") -> Iterator[Item]:
    """``items``, reporting ``what: done/total`` as a bar or as a line at most every ``LINE_EVERY_S``."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if _bars:
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=what, total=total, unit=unit, leave=False)
        return
    of = f"/{total}" if total is not None else ""
    started = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= LINE_EVERY_S:
            log.info("%s: %d%s %s (%.0f s)", what, done, of, unit, now - started)
            last = now
    log.info("%s: %d%s %s done in %.0f s", what, done, of, unit, time.monotonic() - started)
