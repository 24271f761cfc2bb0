"""DiffGraph miniworld."""
