"""Side-by-side benchmarks of xai-audit against the stock tools it replaces (``python -m benchmarks``).

See :mod:`benchmarks.harness` for how a benchmark module is written and :mod:`benchmarks.__main__`
for the runner.
"""
