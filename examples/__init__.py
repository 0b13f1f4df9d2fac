"""Shipped examples: small adapters that the configs in configs/ load through the `python` model source."""
