"""Small helpers shared across splitlbi (file I/O)."""
