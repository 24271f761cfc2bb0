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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (safetensors'
    ``save_file``, say); once the block ends it is fsynced and renamed to ``path``. On any error
    the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then fsync and rename it to
    ``path`` (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """``path`` holds exactly ``data`` afterwards, or is unchanged if writing failed."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
