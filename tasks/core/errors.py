"""The project's own exception types: every expected failure is one of these."""

from __future__ import annotations


class XaiAuditError(Exception):
    """Base class of every error xai-audit raises on purpose (bad input, bad config, bad file)."""


class ConfigError(XaiAuditError):
    """A configuration value is invalid; ``field`` is its dotted path (``models.0.layers``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ItemError(XaiAuditError):
    """One input item (image, mask, checkpoint) is unusable; the run records it and goes on."""

    def __init__(self, item_id: str, message: str, error_type: str | None = None) -> None:
        super().__init__(f"{item_id}: {message}")
        self.item_id = item_id
        self.message = message
        self.error_type = error_type or type(self).__name__


class ImageDecodeError(ItemError):
    """An image file cannot be decoded into RGB pixels (empty, truncated, not an image, too big)."""


class PathEscapeError(ItemError):
    """A path resolves outside the root it must stay under (``..``, absolute, outside symlink)."""


class NonFiniteError(ItemError):
    """A model output, activation or metric of one item is NaN or infinite: flagged, never averaged in."""


class CheckpointError(XaiAuditError):
    """A weights file is unsafe, truncated, or does not match the architecture."""
