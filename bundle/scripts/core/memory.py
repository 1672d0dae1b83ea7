"""Give the memory freed after each tile back to the system (glibc's heap otherwise keeps it).

A slide's tiles allocate and free arrays of a few hundred kB to tens of MB over and over. glibc serves the first
large ones with their own mapping, but each time one is freed it raises that threshold, after which such arrays
come from the heap, which fragments and seldom shrinks: a process keeps memory it no longer uses, more of it the
more tiles it has done. `trim_heap` after each tile hands the free pages back (`malloc_trim`), at a fraction of the
cost of giving every large array its own mapping (which pays fresh page faults on every allocation).
"""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # another C library (musl): nothing to trim
        return None


def trim_heap() -> bool:
    """Return the heap's free pages to the system; True where that is possible (Linux with glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
