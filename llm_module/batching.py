"""Micro-batching of generate requests.

Callers submit requests and wait on a future; one worker thread owns the model.
Whatever queued up while the previous batch ran (plus an optional short window)
is grouped by compatible options and run as one forward pass, adapters mixed.
An idle worker starts at once, so a lone caller pays no window.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any


class MicroBatcher:
    def __init__(
        self,
        run_batch: Callable[[Sequence[Any]], list[Any]],
        *,
        key: Callable[[Any], Any],
        size: Callable[[Any], int] = lambda item: 1,
        window_s: float = 0.0,
        max_batch: int = 16,
        name: str = "llm-batcher",
    ) -> None:
        self._run_batch = run_batch
        self._key = key
        self._size = size
        self.window_s = window_s
        self.max_batch = max_batch
        self._queue: queue.Queue = queue.Queue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        self.batches_run = 0
        self.largest_batch = 0

    def submit(self, item: Any) -> Future:
        if self._stopped.is_set():
            raise RuntimeError("the batcher is stopped")
        future: Future = Future()
        self._queue.put((item, future))
        return future

    def stop(self) -> None:
        self._stopped.set()
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _collect(self, first) -> list:
        """First item plus whatever is queued now, or arrives within the window."""
        pending = [first]
        deadline = time.monotonic() + self.window_s
        while sum(self._size(item) for item, _ in pending) < self.max_batch:
            timeout = deadline - time.monotonic()
            try:
                entry = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is None:
                self._stopped.set()
                break
            pending.append(entry)
        return pending

    def _loop(self) -> None:
        while not self._stopped.is_set():
            first = self._queue.get()
            if first is None:
                break
            groups: dict[Any, list] = {}
            for entry in self._collect(first):
                groups.setdefault(self._key(entry[0]), []).append(entry)
            for entries in groups.values():
                self._run_group(entries)

    def _run_group(self, entries: list) -> None:
        live = [(item, fut) for item, fut in entries if fut.set_running_or_notify_cancel()]
        if not live:
            return
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, sum(self._size(item) for item, _ in live))
        try:
            results = self._run_batch([item for item, _ in live])
        except BaseException as exc:  # every waiter hears about the failure
            for _, fut in live:
                fut.set_exception(exc)
            return
        for (_, fut), result in zip(live, results, strict=True):
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)
