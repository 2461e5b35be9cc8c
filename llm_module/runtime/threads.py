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

That is not enough on its own: a caller's thread may have run torch work before calling us
(another action, user code), or another library may keep a torch model in a thread of its own.
Their idle teams count too, and we cannot end them (``release_openmp_team`` frees only the
calling thread's). So where the model's matmuls run on llm_module's kernels, a lone row's
decoding steps leave OpenMP out: ``kernels_own_the_cores`` gives the serving thread one OpenMP
(and MKL) thread, so torch's own ops run serially there, and the kernels split their matmuls over
their own worker threads (csrc/worker_pool.h), which keep spinning between matmuls whatever other
threads did. Forwards of several rows take torch's OpenMP threads back for their duration
(serving/runner.py): their attention and other torch ops need both cores (bench/findings.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)
_OMP_PAUSE_SOFT = 1  # omp_pause_soft: the team's threads end; the next parallel region starts new ones
_libgomp: list = []
_libmkl: list = []
_GOMP_FUNCTIONS = ("omp_set_num_threads", "omp_pause_resource_all")


def set_thread_count(threads: int | None = None) -> int:
    """Use ``threads`` intra-op threads (torch's and our kernels' workers), by default one per core
    this process may run on (torch's default can exceed that)."""
    import torch

    from . import int4_kernel

    wanted = threads or len(os.sched_getaffinity(0))
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    kernel = int4_kernel.kernel()
    if kernel is not None:
        kernel.set_threads(wanted)
    return wanted


@contextlib.contextmanager
def kernels_own_the_cores(enabled: bool = True) -> Iterator[None]:
    """Inside the block (``enabled``), this thread's matmuls on our kernels are split over the
    kernels' own workers, and torch's ops in it run on one OpenMP (and MKL) thread, leaving the
    cores to those workers; ``enabled=False`` inside such a block gives torch's OpenMP threads back
    for a while (a batch of many rows, whose other ops need both cores). Where our kernel or
    libgomp is out of reach, nothing changes."""
    previous = getattr(_this_thread, "own", False)
    if enabled == previous or not _own_the_cores(enabled):
        yield
        return
    try:
        yield
    finally:
        _own_the_cores(previous)


_this_thread = threading.local()


def _own_the_cores(own: bool) -> bool:
    from . import int4_kernel

    kernel = int4_kernel.kernel()
    gomp = _library(_libgomp, "libgomp", _GOMP_FUNCTIONS) if kernel is not None else None
    if gomp is None:
        return False
    if not hasattr(_this_thread, "threads"):
        import torch

        _this_thread.threads = torch.get_num_threads()  # also lets torch set this thread's count first
    # MKL's C name: the lower-case mkl_set_num_threads_local is its Fortran entry (takes a pointer).
    mkl = _library(_libmkl, "libtorch_cpu", ("MKL_Set_Num_Threads_Local",))
    gomp.omp_set_num_threads(1 if own else _this_thread.threads)
    if mkl is not None:
        mkl.MKL_Set_Num_Threads_Local(1 if own else 0)  # 0: the process-wide count again
    kernel.set_own_workers(own)
    _this_thread.own = own
    return True


def release_openmp_team() -> bool:
    """Free the calling thread's idle OpenMP team, if it has one; True if libgomp was reached."""
    lib = _library(_libgomp, "libgomp", _GOMP_FUNCTIONS)
    if lib is None:
        return False
    lib.omp_pause_resource_all(_OMP_PAUSE_SOFT)
    return True


def _library(memo: list, prefix: str, needed: tuple[str, ...]):
    """The library torch loaded whose file name starts with ``prefix`` and which exports ``needed``
    (found once, kept in ``memo``), or None."""
    if not memo:
        memo.append(_find_library(prefix, needed))
    return memo[0]


def _find_library(prefix: str, needed: tuple[str, ...]):
    import torch  # loads libgomp and libtorch_cpu, if they are not loaded yet

    # torch's own copy first: other wheels vendor a libgomp of their own (sentencepiece's is
    # loaded beside torch's), and setting that one's threads changes nothing of torch's.
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    candidates = sorted(_loaded_libraries(), key=lambda path: not path.startswith(torch_dir))
    for path in candidates:
        if os.path.basename(path).startswith(prefix):
            try:
                lib = ctypes.CDLL(path)
                for name in needed:
                    getattr(lib, name).argtypes = [ctypes.c_int]
                return lib
            except (OSError, AttributeError) as exc:
                log.debug("%s at %s is not usable: %s", prefix, path, exc)
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
