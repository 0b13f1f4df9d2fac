"""Content-addressed on-disk cache shared by every stage (safe to delete at any time)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """The cache directory: ``$XAI_AUDIT_CACHE`` or ``~/.cache/xai-audit``, created on demand."""
    root = Path(os.environ.get("XAI_AUDIT_CACHE") or Path.home() / ".cache" / "xai-audit")
    root.mkdir(parents=True, exist_ok=True)
    return root


def content_key(**parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts, used to name cache entries."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_dir(kind: str, **parts: Any) -> Path:
    """A cache folder for one entry of ``kind`` keyed by ``parts`` (created, maybe still empty)."""
    path = cache_root() / kind / content_key(**parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
