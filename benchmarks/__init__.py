"""Side-by-side benchmarks of xai-audit against the stock tools it replaces (``python -m benchmarks``).

See :mod:`benchmarks.harness` for how a benchmark module is written and :mod:`benchmarks.__main__`
for the runner.
"""

import os as _os

# The CLI's quiet, patient offline Prefect settings, set before any benchmark imports Prefect
# (Prefect reads its settings once, at import); values the user set win.
for _key, _value in (
    ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
    ("DO_NOT_TRACK", "1"),
    ("PREFECT_LOGGING_LEVEL", "WARNING"),
    ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"),
):
    _os.environ.setdefault(_key, _value)
