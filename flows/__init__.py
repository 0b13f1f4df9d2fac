"""xai-audit: flows package."""
