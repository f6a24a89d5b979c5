"""etris_release (placeholder: filled by its release port)."""
