"""segvit_release (placeholder: filled by its release port)."""
