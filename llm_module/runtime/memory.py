"""Giving memory back to the OS after large temporary work (a training job's model copy, an export)."""

from __future__ import annotations

import ctypes
import gc


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise),
    so a long-running server's resident memory returns to its serving size after a training job."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
