"""Model sources: one module per place models come from (see :mod:`xai_audit.tasks.data.sources.registry`)."""
