"""DiffGraph benchmarks."""
