"""Giving memory back to the OS after large temporary work (a training job's model copy, an export)."""

from __future__ import annotations

import ctypes
import gc
import os

# Blocks of this size or more are mapped on their own, so freeing one gives its pages back at once.
MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise),
    so a long-running server's resident memory returns to its serving size after a training job."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc keeps them otherwise); a few ms."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def keep_large_blocks_returnable() -> None:
    """Fix glibc's mmap threshold at 1 MiB for this process (unless the user set MALLOC_MMAP_THRESHOLD_).

    Why: glibc raises the threshold to the size of each mapped block freed (up to 32 MiB), so once a
    training job's model copy is freed, the server's later tensors of up to 32 MiB come from the heap,
    where the freed pages around them are not given back: 800 requests around an 8-record job left
    +12.0 % resident memory, +4.8 % with the threshold fixed (bench/findings.md).
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc
        pass
