"""A Chroma directory that cannot be read is set aside and rebuilt from the catalog.

The catalog is the truth and Chroma a derived copy (store.py): every vector can be recomputed
from a description text the catalog holds, so a damaged vector store costs re-embedding time,
never data. Damage is what Chroma's own users meet after a process dies mid-flush or a disk
misbehaves (chroma #7090, #7238): a torn ``index_metadata.pickle``, a truncated or overwritten
``data_level0.bin``, a lost segment folder, a malformed ``chroma.sqlite3``.

Rules:
- Readable means: Chroma opens the folder, and every partition answers a count, a read of
  every vector (each still unit length and the bytes its ``vector_sha256`` records, as
  ``VectorStore.upsert_many`` stored it) and a nearest neighbour query. A folder that merely
  opens is not enough: Chroma loads a partition's index on first use, and that is where damage
  shows.
- The check runs in a child process, because on some damage Chroma's native index loader
  crashes the whole process (SIGSEGV) instead of raising (chroma #7238); a crash, an exception
  or a hang in the child all mean unreadable, and the caller survives to say so.
- An unreadable folder is renamed, never deleted (``chroma.unreadable-<UTC time>``): it may be
  what someone wants to inspect or attach to a bug report. The next open starts an empty store,
  and ``reconcile`` then finds every vector missing and embeds it from the catalog.
- A Chroma server (DIFFGRAPH_CHROMA_URL) is not ours to move: its damage is its operator's.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from ..errors import one_line
from .vectors import VectorStore

PROBE_TIMEOUT = 600.0  # seconds: reading 100k vectors takes about a minute here; a hang is damage too


def probe(path: Path, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when the Chroma folder ``path`` is readable (see the module rules; an absent folder
    is an empty store, so readable), else why not, in one line."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        done = subprocess.run([sys.executable, "-m", __name__, str(path)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"reading it did not finish in {timeout:.0f} s"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        return f"reading it crashed the reader ({signal.Signals(-done.returncode).name})"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return one_line(lines[-1] if lines else f"the reader exited with status {done.returncode}")


def set_aside(path: Path) -> Path:
    """Rename the folder ``path`` to ``<path>.unreadable-<UTC time>`` (a new name each time) and
    return where it went."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.unreadable-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.unreadable-{stamp}-{n}")
    path.rename(target)
    return target


def recover(path: Path, *, repair: bool = True, timeout: float = PROBE_TIMEOUT) -> dict:
    """Probe the Chroma folder ``path``; when it is unreadable and ``repair``, set it aside so that
    the next open starts empty. Returns ``{"unreadable": reason or None, "set_aside": new path
    or None}``."""
    reason = probe(path, timeout)
    moved = set_aside(path) if reason is not None and repair else None
    return {"unreadable": reason, "set_aside": None if moved is None else str(moved)}


def _read_back(path: str) -> None:
    """The child's work: open the folder and read all of it (VectorStore.read_back)."""
    vectors = VectorStore.open(Path(path))
    try:
        vectors.read_back()
    finally:
        vectors.close()


if __name__ == "__main__":
    try:
        _read_back(sys.argv[1])
    except Exception as exc:  # noqa: BLE001 (any failure to read is the answer, told in one line)
        print(one_line(f"{type(exc).__name__}: {exc}"), file=sys.stderr)
        sys.exit(1)
