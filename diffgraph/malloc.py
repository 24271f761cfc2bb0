"""Bounding glibc's malloc arenas in a long-running, many-threaded process (the server).

glibc gives threads their own malloc arenas, up to eight per core, so that threads rarely
wait on one another's allocations. A server hands each request to whichever worker of its
thread pool is free, so over hours every worker's arena holds some of the memory a render, an
embedding or an image encode freed, in pieces too scattered to give back to the system, and
RSS creeps up although nothing leaks. In the soak benchmark (benchmarks/RESULTS.md, "A soak
of the HTTP API") RSS grew 3.25 MB a minute with glibc's default arenas and 0.06 with
MALLOC_ARENA_MAX=2, side by side in one run; with this cap RSS stayed at 859-860 MB for the
last 100 minutes of a 2-hour soak. The price is speed: the load benchmark answered 9% fewer
requests a second with the cap (five paired rounds, slower in each; where the time goes was
not measured). A server that runs for days is worth that; set MALLOC_ARENA_MAX yourself to
choose otherwise.

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
