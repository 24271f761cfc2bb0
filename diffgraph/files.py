"""Writing files so that no reader ever sees half of one.

A file written in place and cut short by a crash (kill -9, power loss) is a truncated file
under its final name, which the next reader takes for a whole one. Everything DiffGraph
publishes for others to read (graph exports, images, planner checkpoints, exported models) is
therefore written to a temporary name in the same directory, flushed to disk, and renamed over
the final name: ``rename`` is atomic on POSIX, so a reader finds the old file, the new file, or
none, never a mix. A crash leaves at most a ``.<name>.*.tmp`` file behind, which no reader looks
at.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def _temporary(path: Path) -> Iterator[tuple[int, Path]]:
    """An open temporary file beside ``path`` (descriptor and name), renamed to ``path`` once
    the block ends; on any error it is removed and ``path`` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        yield fd, Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (safetensors'
    ``save_file``, say); once the block ends it is fsynced and renamed to ``path``."""
    with _temporary(Path(path)) as (fd, tmp):
        os.close(fd)
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then fsync and rename it to
    ``path``; on any error ``path`` is left as it was."""
    with _temporary(Path(path)) as (fd, _), os.fdopen(fd, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """``path`` holds exactly ``data`` afterwards, or is unchanged if writing failed."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def size_text(n: int | float) -> str:
    """Bytes for people: "1.23 GiB", "456.7 MiB" or "12.0 KiB"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def disk_full(exc: BaseException) -> bool:
    """Is ``exc`` the filesystem running out of space (ENOSPC, or a quota: EDQUOT)? Rust
    writers (safetensors) report it as their own error type, naming the OS error code."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return "StorageFull" in text or f"code: {errno.ENOSPC}," in text or "No space left on device" in text


def free_bytes(directory: str | Path) -> int:
    """Free space for an unprivileged writer on the filesystem holding ``directory`` (or the
    nearest existing parent)."""
    path = Path(directory)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free
