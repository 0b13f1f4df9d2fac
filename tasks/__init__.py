"""xai-audit: tasks package."""
