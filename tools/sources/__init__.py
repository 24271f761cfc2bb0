"""DiffGraph tools/sources."""
