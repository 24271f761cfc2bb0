"""Writing files so that no reader ever sees half of one.

A file written in place and cut short by a crash (kill -9, power loss) is a truncated file
under its final name, which the next reader takes for a whole one. Everything DiffGraph
publishes for others to read (graph exports, images, planner checkpoints) is therefore written
to a temporary name in the same directory, flushed to disk, and renamed over the final name:
``rename`` is atomic on POSIX, so a reader finds the old file, the new file, or none, never a
mix. A crash leaves at most a ``.<name>.*.tmp`` file behind, which no reader looks at.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then fsync and rename it to
    ``path``. On any error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """``path`` holds exactly ``data`` afterwards, or is unchanged if writing failed."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
