"""Which threads may run torch work, and why it matters on a CPU.

torch's CPU ops run on OpenMP (libgomp). Every OS thread that runs a parallel op keeps its own
team of OpenMP workers for as long as it lives, and once a process holds more OpenMP threads
than cores, libgomp stops spin-waiting between parallel regions. A decode step is hundreds of
tiny parallel regions, so that halved single-stream speed on 2 cores (bench/findings.md).

So one long-lived thread runs forward passes: the serving core's loop (serving/scheduler.py),
which also runs every other piece of work on the served model between steps and ends when idle.
Work on other copies (setup's loading, foreground training) runs in a short-lived thread of its
own, whose OpenMP team goes away when it ends, never in the caller's thread, which may be jsctl's
main thread or a server worker that lives forever.

A caller's thread may have run torch work of its own before calling us (another action, user
code): its idle team would slow every step of ours. ``release_openmp_team`` frees the calling
thread's team (OpenMP 5's ``omp_pause_resource_all``, which only acts on the thread that calls
it), so the engine's entry points call it before they hand work to the loop.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)
_OMP_PAUSE_SOFT = 1  # omp_pause_soft: the team's threads end; the next parallel region starts new ones
_libgomp: list = []


def set_thread_count(threads: int | None = None) -> int:
    """Use ``threads`` intra-op threads, by default one per core this process may run on (torch's
    default can exceed that)."""
    import torch

    wanted = threads or len(os.sched_getaffinity(0))
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return wanted


def release_openmp_team() -> bool:
    """Free the calling thread's idle OpenMP team, if it has one; True if libgomp was reached."""
    if not _libgomp:
        _libgomp.append(_find_libgomp())
    lib = _libgomp[0]
    if lib is None:
        return False
    lib.omp_pause_resource_all(_OMP_PAUSE_SOFT)
    return True


def _find_libgomp():
    """The libgomp that torch runs on (already loaded into this process), or None."""
    import torch  # noqa: F401  (loads libgomp, if it is not loaded yet)

    for path in _loaded_libraries():
        if os.path.basename(path).startswith("libgomp"):
            try:
                lib = ctypes.CDLL(path)
                lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
                return lib
            except (OSError, AttributeError) as exc:
                log.debug("libgomp at %s is not usable: %s", path, exc)
    return None


def _loaded_libraries() -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            return sorted({line.split()[-1] for line in maps if ".so" in line and "/" in line})
    except OSError:
        return []


def run_in_fresh_thread(fn: Callable[..., T], *args: Any, thread_name: str = "llm-model-work", **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` in a new thread, wait for it, return its result or raise its error."""
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller, traceback included
            outcome["error"] = exc

    thread = threading.Thread(target=work, name=thread_name, daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
