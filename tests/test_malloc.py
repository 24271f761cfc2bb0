"""A server bounds glibc's malloc arenas (diffgraph/malloc.py): threads started after the limit
share two arenas instead of taking one each, which is what keeps a long-running server's RSS
flat (benchmarks/RESULTS.md, the soak)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from diffgraph.malloc import limit_arenas

# Eight threads alive at once, each allocating and freeing, then glibc's own count of arenas.
PROBE = """
import ctypes, sys, threading
from diffgraph.malloc import limit_arenas
print(limit_arenas() if sys.argv[1] == "limit" else None, file=sys.stderr)
barrier = threading.Barrier(8)
def work():
    barrier.wait()
    blocks = [bytearray(4096 + i) for i in range(500)]
    del blocks[::2]
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
ctypes.CDLL(None).malloc_stats()
"""

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="per-thread arenas are glibc's")


def _arenas(mode: str, **env) -> tuple[int, str]:
    run = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in {**os.environ, **env}.items() if v is not None})
    assert run.returncode == 0, run.stderr
    return sum(line.startswith("Arena ") for line in run.stderr.splitlines()), run.stderr.splitlines()[0]


@glibc
def test_threads_started_after_the_limit_share_two_arenas():
    unlimited, _ = _arenas("none", MALLOC_ARENA_MAX=None)
    limited, took = _arenas("limit", MALLOC_ARENA_MAX=None)
    assert unlimited > 2, "the probe must make glibc create an arena per thread, or it tests nothing"
    assert took == "True" and limited <= 2


@glibc
def test_a_users_malloc_arena_max_wins():
    arenas, took = _arenas("limit", MALLOC_ARENA_MAX="4")
    assert took == "False" and 2 < arenas <= 4


def test_a_process_needs_an_arena():
    with pytest.raises(ValueError, match="at least one"):
        limit_arenas(0)
