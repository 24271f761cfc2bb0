"""Bounding glibc's malloc arenas in a long-running, many-threaded process (the server).

glibc gives threads their own malloc arenas, up to eight per core, so that threads rarely
wait on one another's allocations. A server hands each request to whichever worker of its
thread pool is free, so over hours every worker's arena holds some of the memory a render, an
embedding or an image encode freed, in pieces too scattered to give back to the system, and
RSS creeps up although nothing leaks: +3.25 MB a minute at the soak benchmark's rate with
the default arenas, +0.06 with two, in the same run (benchmarks/RESULTS.md, "A soak of the HTTP
API"). Renders take the one device in turn and Python's GIL serialises the rest, so two arenas
cost no measurable throughput here.

The limit only applies to arenas created after the call, so ``serve`` makes it before any
worker thread exists. A MALLOC_ARENA_MAX set by the user wins (glibc read it at start-up).
Other C libraries (musl, macOS) have no per-thread arenas and nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_ARENA_MAX = -8  # glibc's <malloc.h>
SERVER_ARENAS = 2


def limit_arenas(n: int = SERVER_ARENAS) -> bool:
    """At most ``n`` malloc arenas from now on; True if glibc took the limit, False where there
    is no glibc or the user already chose MALLOC_ARENA_MAX."""
    if n < 1:
        raise ValueError("a process needs at least one malloc arena")
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # no C library by that name, or one without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_ARENA_MAX, n) == 1
