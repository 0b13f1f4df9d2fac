"""Target 7, cold: ``xai-audit run configs/demo.yaml`` with an empty cache (minutes: it generates the
world and trains the demo model and the toy CLIP), so it runs only when named:
``python -m benchmarks --only demo_cold``. The warm half of the target is in ``bench_pipeline``."""

from __future__ import annotations

from benchmarks.bench_pipeline import demo_cold_result, private_cache
from benchmarks.harness import Result

TARGETS = ("7 demo cold",)


def run(size: str) -> list[Result]:
    """The cold demo at ``size`` (``tiny``: the shrunken config, in seconds)."""
    with private_cache(size):
        return [demo_cold_result(size)]
