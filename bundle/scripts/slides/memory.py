"""Give memory freed after each tile back to the system (glibc's heap otherwise keeps it).

A slide's tiles allocate and free arrays of a few hundred kB to tens of MB over and over. glibc serves the first
large ones with their own mmap, but every time one is freed it raises its threshold, after which such arrays come
from the heap, which fragments and rarely shrinks: the process keeps memory it no longer uses, more of it the more
tiles it runs. Fixing the threshold keeps large arrays in their own mappings, returned on free.
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter; setting it also turns off the moving threshold
MMAP_THRESHOLD = 256 * 1024


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve allocations of `threshold` bytes or more with their own mapping in this process and the processes it
    forks; True where that took effect (Linux with glibc), False elsewhere, where nothing changes.

    Args:
        threshold: the smallest allocation, in bytes, given its own mapping.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # another C library (musl) or no mallopt
        return False
