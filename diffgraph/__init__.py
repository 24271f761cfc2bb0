"""DiffGraph: agent-driven merging of community text-to-image experts.

The subpackages live in the repository's top-level folders (agents/, tools/, graph_store/,
planner/, merger/, miniworld/) and are importable as ``diffgraph.<folder>``.
"""

import logging
import os

# Busy-waiting OpenMP threads made torch steps ~10x slower on a 2-core machine whenever another
# process held a core; this must be set before torch initialises OpenMP, hence at import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")



class _TorchvisionFallbackNotice(logging.Filter):
    """Drops transformers' "`XImageProcessor` requires torchvision; falling back to
    `XImageProcessorPil`" warning. torchvision stays out of a DiffGraph environment on purpose
    (PyPI's build breaks beside CPU torch), so the PIL processors are the intended ones and the
    notice, printed on every start, would only tell a new user to install what breaks things."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackNotice())

__version__ = "0.1.0"
