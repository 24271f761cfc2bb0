"""DiffGraph merger."""
