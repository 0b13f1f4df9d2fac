"""xai-audit: storage package."""
