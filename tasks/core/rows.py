"""The one way an ``errors`` row is built, so every stage names failures alike."""

from __future__ import annotations

from xai_audit.tasks.core.errors import ItemError


def error_row(stage: str, model: str | None, error: Exception, item_id: str | None = None) -> dict:
    """An ``errors`` row for ``error`` in ``stage``: an :class:`ItemError` brings its own item id,
    type and message; any other exception is named by its class (then ``item_id`` is required)."""
    if isinstance(error, ItemError):
        item_id, error_type, message = error.item_id if item_id is None else item_id, error.error_type, error.message
    else:
        error_type, message = type(error).__name__, str(error)
    if item_id is None:
        raise ValueError("item_id is required for an error that is not an ItemError")
    return {"stage": stage, "item_id": item_id, "error_type": error_type, "message": message, "model": model}
