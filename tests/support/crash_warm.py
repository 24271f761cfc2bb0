"""Imported by the crash tests' forkserver before it forks any child: loads the models every
child needs (MiniLM, the mini-world pipeline and its metric suite) once, so each killed and
restarted child starts working at once instead of spending its seconds reloading them. A real
restart reloads them; what the crash tests check (what is on disk after a kill) does not depend
on it. Torch runs single-threaded here, so forking after it is safe."""

import torch

torch.set_num_threads(1)

from diffgraph.text_embedding import embed  # noqa: E402
from diffgraph.tools import bases  # noqa: E402

embed(["warm up"])
bases.engine_for("miniworld-sd")
bases.suite_for("miniworld-sd")
