"""DiffGraph tools."""
