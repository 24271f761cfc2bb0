"""DiffGraph agents."""
