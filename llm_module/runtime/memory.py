"""Process memory: how glibc's heap serves a forward's activations, and giving memory back to the OS
after large temporary work (a training job's model copy, an export) or when serving goes idle."""

from __future__ import annotations

import ctypes
import gc
import os

MMAP_THRESHOLD_BYTES = 32 << 20  # blocks this size or more are mapped on their own (glibc's own ceiling)
TRIM_THRESHOLD_BYTES = 64 << 20  # free memory the heap keeps at its top between forwards
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


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


def set_heap_policy() -> None:
    """Fix glibc's heap thresholds for this process (unless the user set MALLOC_MMAP_THRESHOLD_ or
    MALLOC_TRIM_THRESHOLD_): blocks under 32 MiB come from the heap, and the heap keeps up to 64 MiB
    free at its top; the serving core hands it back when it goes idle (:func:`trim_heap`).

    Why: a forward allocates and frees each layer's activations. Where glibc maps such a block on
    its own, or trims the heap top after it is freed, the next one page-faults all of its pages
    again: a prefill of 8 prompts of 17 tokens took 27,000 page faults and ~25 % of its time, one
    of 8 x 100 tokens half of it (bench/findings.md). Fixed rather than glibc's moving thresholds,
    so a server behaves the same before and after a training job frees its model copy; memory
    after a job still returns to its serving size, by the trim at idle.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc
        pass
