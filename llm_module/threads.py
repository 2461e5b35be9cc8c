"""Which threads may run torch work, and why it matters on a CPU.

torch's CPU ops run on OpenMP (libgomp). Every OS thread that runs a parallel op keeps its own
team of OpenMP workers for as long as it lives, and once a process holds more OpenMP threads
than cores, libgomp stops spin-waiting between parallel regions. A decode step is hundreds of
tiny parallel regions, so that halved single-stream speed on 2 cores (bench/README.md: 36-40
tokens/s alone, 18-20 once a second long-lived thread had run one op).

So one long-lived thread runs forward passes: the micro-batcher's worker, which also runs
streams between batches and ends when idle. Any other model work (setup, adapter loading,
evaluation, scoring, foreground training) runs in a short-lived thread of its own, whose OpenMP
team goes away when it ends, never in the caller's thread, which may be jsctl's main thread or
a server worker that lives forever.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


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
