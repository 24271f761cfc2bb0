"""DiffGraph: agent-driven merging of community text-to-image experts.

The subpackages live in the repository's top-level folders (agents/, tools/, graph_store/,
planner/, merger/, miniworld/) and are importable as ``diffgraph.<folder>``.
"""

import os

# Busy-waiting OpenMP threads made torch steps ~10x slower on a 2-core machine whenever another
# process held a core; this must be set before torch initialises OpenMP, hence at import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
