"""Micro-batching of generate requests.

Callers submit requests and wait on a future; one worker thread owns the model.
Whatever queued up while the previous batch ran (plus an optional short window)
is grouped by compatible options and run as one forward pass, adapters mixed.
An idle worker starts at once, so a lone caller pays no window. Callers answered by a batch
usually come straight back (a walker generating in a loop), so the next batch waits up to
``rejoin_s`` after the last one ended for them (see ``_collect``): without that wait,
concurrent callers drift into a batch of one followed by a batch of the rest, each paying a
full generation. Other model work that must
run on the same thread (a stream) is submitted with ``submit_call`` and runs alone, between
batches: llm_module/threads.py says why one thread does all forward passes. For the same
reason the worker ends after ``idle_exit_s`` without work (its OpenMP team goes with it, so a
training run or an evaluation in another thread gets the cores' full speed) and the next
request starts a new one.

A running batch may also stop early for compatible requests waiting behind it (``waiting``):
it hands its items back as ``Unfinished`` remainders, which open the next batch together with
the newcomers. The batch's owner decides when (llm_module/engine.py).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any


class _Call:
    """A callable queued to run alone on the worker thread."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn


_IDLE = object()  # the worker's signal to itself that it may end


class Unfinished:
    """A batch's result for an item it stopped early to make room: run ``item`` (its remainder) next."""

    __slots__ = ("item",)

    def __init__(self, item: Any) -> None:
        self.item = item


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
        idle_exit_s: float = 1.0,
        rejoin_s: float = 0.03,
    ) -> None:
        self._run_batch = run_batch
        self._key = key
        self._size = size
        self.window_s = window_s
        self.max_batch = max_batch
        self.idle_exit_s = idle_exit_s
        self.rejoin_s = rejoin_s
        self._expected = 0  # requests queued when the last batch ended plus those it answered
        self._answered_at = 0.0  # when it ended
        self._name = name
        self._queue: queue.Queue = queue.Queue()
        self._stopped = threading.Event()
        self._lock = threading.Lock()  # orders "start a worker" against "the worker ends"
        self._thread: threading.Thread | None = None
        self.workers_started = 0
        self.batches_run = 0
        self.largest_batch = 0
        self.resumed = 0  # items handed back Unfinished and run again

    def submit(self, item: Any) -> Future:
        if self._stopped.is_set():
            raise RuntimeError("the batcher is stopped")
        future: Future = Future()
        with self._lock:
            self._queue.put((item, future))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
                self.workers_started += 1
        return future

    def submit_call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on the worker thread, alone, after the batches already queued."""
        return self.submit(_Call(fn))

    def waiting(self, key: Any) -> int:
        """Rows queued now that could share a batch with ``key`` (a running batch may yield to them)."""
        with self._queue.mutex:
            entries = list(self._queue.queue)
        return sum(self._size(entry[0]) for entry in entries
                   if entry is not None and not isinstance(entry[0], _Call) and self._key(entry[0]) == key)

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            thread = self._thread
        self._queue.put(None)
        if thread is not None:
            thread.join(timeout=5)

    def _next(self):
        """The next queue entry, or _IDLE once the queue stayed empty for ``idle_exit_s``."""
        try:
            return self._queue.get(timeout=self.idle_exit_s)
        except queue.Empty:
            with self._lock:  # submit cannot queue between this check and the worker's end
                if self._queue.empty():
                    self._thread = None
                    return _IDLE
            return self._queue.get_nowait()

    def _collect(self, start: list) -> tuple[list, list]:
        """``start`` plus whatever is queued now or arrives within the window; calls apart.

        Until the batch holds what was queued when the last batch ended plus as many requests as
        that batch answered, the wait extends to ``rejoin_s`` after it ended, so callers coming
        back ride together.
        """
        pending, calls = list(start), []
        deadline = time.monotonic() + self.window_s
        rejoin_deadline = max(deadline, self._answered_at + self.rejoin_s)
        while sum(self._size(item) for item, _ in pending) < self.max_batch:
            timeout = (rejoin_deadline if len(pending) < self._expected else deadline) - time.monotonic()
            try:
                entry = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is None:
                self._stopped.set()
                break
            if isinstance(entry[0], _Call):
                calls.append(entry)
                break  # run what came before it first, then the call
            pending.append(entry)
        return pending, calls

    def _loop(self) -> None:
        carried: list = []  # items a batch handed back unfinished: they open the next batch
        while not self._stopped.is_set():
            if not carried:
                first = self._next()
                if first is _IDLE:
                    return
                if first is None:
                    break
                if isinstance(first[0], _Call):
                    self._run_call(*first)
                    continue
                carried = [first]
            pending, calls = self._collect(carried)
            groups: dict[Any, list] = {}
            for entry in pending:
                groups.setdefault(self._key(entry[0]), []).append(entry)
            carried = [entry for entries in groups.values() for entry in self._run_group(entries)]
            self._expected, self._answered_at = len(pending) + self._queue.qsize(), time.monotonic()
            for call in calls:
                self._run_call(*call)
        for _, future in carried:  # stopped with remainders in hand: their callers must not hang
            future.set_exception(RuntimeError("the batcher was stopped before this request finished"))

    @staticmethod
    def _run_call(call: _Call, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(call.fn())
        except BaseException as exc:
            future.set_exception(exc)

    def _run_group(self, entries: list) -> list:
        """Run one batch and answer its futures; return the entries it handed back unfinished."""
        # A carried entry's future is running already.
        live = [(item, fut) for item, fut in entries if fut.running() or fut.set_running_or_notify_cancel()]
        if not live:
            return []
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, sum(self._size(item) for item, _ in live))
        try:
            results = self._run_batch([item for item, _ in live])
        except BaseException as exc:  # every waiter hears about the failure
            for _, fut in live:
                fut.set_exception(exc)
            return []
        unfinished = []
        for (_, fut), result in zip(live, results, strict=True):
            if isinstance(result, Unfinished):
                unfinished.append((result.item, fut))
                self.resumed += 1
            elif isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)
        return unfinished
