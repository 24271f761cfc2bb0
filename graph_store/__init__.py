"""DiffGraph graph_store."""
