"""The mini world: a small, real text-to-image ecosystem that DiffGraph builds and ships itself
(a toy-size diffusers Stable Diffusion, its experts, their homepages, a local hub and scorers).

``ARTIFACTS`` is the committed build; DIFFGRAPH_MINIWORLD_DIR points everything at another one
(for instance a `diffgraph miniworld build --quick` used while developing).
"""

import os
from pathlib import Path

ARTIFACTS = Path(os.environ.get("DIFFGRAPH_MINIWORLD_DIR") or Path(__file__).parent / "artifacts")
