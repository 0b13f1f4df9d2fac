"""Model sources: one module per place models come from (see :mod:`tasks.data.sources.registry`)."""
