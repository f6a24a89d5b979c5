"""lseg_release (placeholder: filled by its release port)."""
