"""The step loop: every generation in llm_module runs here, as rows of one running batch.

One thread owns the model (runtime/threads.py says why on a CPU) and loops:

1. **Admit**: waiting rows take free slots (up to ``max_rows``), FIFO, between steps.
2. **Prefill**: the oldest rows still reading their prompt run one chunk of it (at most
   ``prefill_chunk`` padded tokens in all), so a long prompt never stalls the others for its whole
   length; a row whose prompt is done picks its first token and joins the decoding rows.
3. **Decode**: every decoding row feeds its last token in one forward and picks its next one with
   its own sampling settings (sampling.py).
4. **Finish**: a row that hit end-of-sequence, a stop string or its token limit, or whose reader
   went away, leaves at once, and its caller is answered.

Decoding rows always sit in slots ``0:n`` (the cache reads them as a view); a leaving row's slot
is filled by the last decoding row. Other work on the model (loading or dropping an adapter,
evaluation, beam search, a model swap) is a ``call``: it runs on this thread between two steps,
so it never races a forward; a swap first lets the running rows finish. Past ``max_queued``
waiting rows, ``submit`` refuses with ``Overloaded`` (HTTP 503 with a Retry-After hint): the
queue is never unbounded. With nothing to do for ``idle_exit_s`` the thread ends (its OpenMP
team goes with it) and the next request starts another.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, NamedTuple

from ..errors import Conflict, Overloaded
from .request import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, Event, RequestHandle, Row
from .runner import ModelRunner
from .sampling import Pick, pick_tokens

log = logging.getLogger(__name__)


class Versions(NamedTuple):
    """What the runner was built for: it is rebuilt when ``model`` changes, refreshed when ``adapters`` does."""

    model: int
    adapters: int
    adapter_names: frozenset


class _Call:
    __slots__ = ("fn", "future", "drain")

    def __init__(self, fn: Callable[[], Any], drain: bool) -> None:
        self.fn, self.future, self.drain = fn, Future(), drain


# Every live scheduler, stopped at interpreter exit. Why: a daemon thread still inside a torch op when
# the interpreter finalizes is ended by pthread_exit in C++ code, which aborts the process
# ("terminate called without an active exception", exit status -6) after the caller had its answer.
_live: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    for scheduler in list(_live):
        scheduler.stop()


class Scheduler:
    def __init__(self, build_runner: Callable[[], ModelRunner], versions: Callable[[], Versions], *,
                 max_rows: int = 16, max_queued: int = 256, prefill_chunk: int = 256,
                 idle_exit_s: float = 1.0, name: str = "llm-serving") -> None:
        """``build_runner`` makes a runner for the current model and adapters; ``versions()`` changes
        whenever either changes (the runner is then rebuilt, or its adapters refreshed)."""
        self._build_runner = build_runner
        self._versions = versions
        self.max_rows = max_rows
        self.max_queued = max_queued
        self.prefill_chunk = prefill_chunk
        self.idle_exit_s = idle_exit_s
        self._name = name
        self._cond = threading.Condition()
        self._waiting: deque[Row] = deque()
        self._calls: deque[_Call] = deque()
        self._decoding: list[Row] = []  # row i sits in slot i
        self._prefilling: list[Row] = []  # oldest first, in any free slots
        self._runner: ModelRunner | None = None
        self._runner_versions: Versions | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.stats = {"steps": 0, "decode_steps": 0, "prefill_steps": 0, "largest_batch": 0,
                      "workers_started": 0, "rows_admitted": 0, "refused": 0, "decodes_deferred": 0}
        self._deferred = False  # the last step left the decoding rows for newcomers' prefill
        _live.add(self)

    # ================================================================== callers' side
    def submit(self, handle: RequestHandle, rows: list[Row]) -> RequestHandle:
        """Queue ``rows`` (the request of ``handle``); refuse when the queue is full."""
        with self._cond:
            if self._stopped:
                raise RuntimeError("the serving core is stopped")
            free = self.max_rows - len(self._decoding) - len(self._prefilling)
            if len(self._waiting) + len(rows) > self.max_queued + max(free, 0):
                self.stats["refused"] += 1
                raise Overloaded(
                    f"The server is busy: {len(self._waiting)} rows are waiting (the queue holds "
                    f"{self.max_queued}). Retry in a moment, or ask for fewer prompts or sequences.",
                    retry_after=1.0)
            handle.rows = rows
            self._waiting.extend(rows)
            self._wake()
        return handle

    def call(self, fn: Callable[[], Any], *, drain: bool = False) -> Any:
        """Run ``fn()`` on the model's thread between two steps and return its result.

        ``drain``: first let the running rows finish (admitting none meanwhile): for a model swap.
        """
        if threading.current_thread() is self._thread:
            return fn()  # already between steps (a call that calls)
        call = _Call(fn, drain)
        with self._cond:
            if self._stopped:
                raise RuntimeError("the serving core is stopped")
            self._calls.append(call)
            self._wake()
        return call.future.result()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout=30)
        error = RuntimeError("the serving core stopped before this request finished")
        for row in [*self._waiting, *self._decoding, *self._prefilling]:
            row.handle.fail(error)
        for call in self._calls:
            call.future.set_exception(error)

    def snapshot(self) -> dict:
        with self._cond:
            return {**self.stats, "running": len(self._decoding) + len(self._prefilling),
                    "decoding": len(self._decoding), "waiting": len(self._waiting), "alive": self._thread is not None}

    def adapters_in_use(self) -> set[str]:
        """Adapters of rows running or waiting (an adapter in use is not unloaded to make room)."""
        with self._cond:
            return {row.adapter for row in [*self._decoding, *self._prefilling, *self._waiting] if row.adapter}

    def _wake(self) -> None:
        """Hold ``_cond``. Start the loop thread if none runs; else wake it."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self.stats["workers_started"] += 1
            self._thread.start()
        self._cond.notify_all()

    # ================================================================== the loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._has_work():
                    if not self._stopped:  # a stop during the last steps is not waited past
                        self._cond.wait(self.idle_exit_s)
                    if not self._has_work() or self._stopped:
                        self._thread = None
                        if self._runner is not None:
                            self._runner.release()
                        return
                calls = self._take_calls()
            try:
                for call in calls:
                    self._run_call(call)
                if self._decoding or self._prefilling or self._waiting:
                    self._run_steps()
            except Exception as exc:  # never leave a caller waiting on a dead loop
                log.exception("The serving loop failed; failing the running requests")
                self._fail_running(exc)
                self._runner = None

    def _has_work(self) -> bool:
        if self._stopped:
            return False
        runnable = self._decoding or self._prefilling or (self._waiting and not self._draining())
        return bool(runnable or self._ready_calls())

    def _draining(self) -> bool:
        return any(call.drain for call in self._calls)

    def _ready_calls(self) -> list[_Call]:
        busy = bool(self._decoding or self._prefilling)
        ready = []
        for call in self._calls:
            if call.drain and busy:
                break  # it waits for the running rows; later calls wait behind it
            ready.append(call)
        return ready

    def _take_calls(self) -> list[_Call]:
        ready = self._ready_calls()
        for _ in ready:
            self._calls.popleft()
        return ready

    def _run_call(self, call: _Call) -> None:
        if not call.future.set_running_or_notify_cancel():
            return
        try:
            call.future.set_result(call.fn())
        except BaseException as exc:
            call.future.set_exception(exc)
        finally:
            self._refresh()

    def _refresh(self) -> None:
        """After a call: a new model gets a new runner (the call drained the rows first); changed
        adapters get fresh per-row tables, and rows whose adapter is gone fail."""
        versions = self._versions()
        runner = self._runner
        if runner is None or versions == self._runner_versions:
            return
        if versions.model != self._runner_versions.model:
            if self._decoding or self._prefilling:
                raise RuntimeError("the model changed under running rows; a swap must drain them first")
            self._runner = None  # built for the new model at the next step
            return
        runner.refresh_adapters()
        self._runner_versions = versions
        for row in [*self._decoding, *self._prefilling, *self._waiting]:
            if row.adapter is not None and row.adapter not in versions.adapter_names:
                self._fail(row, Conflict(f"Adapter {row.adapter!r} was unloaded while this request ran; "
                                         "load it again and retry."))

    def _ensure_runner(self) -> ModelRunner:
        if self._runner is None:
            self._runner = self._build_runner()
            self._runner_versions = self._versions()
        return self._runner

    def _run_steps(self) -> None:
        """Step until there is nothing to run or a call is waiting."""
        runner = self._ensure_runner()
        with runner.session():
            while not self._stopped:
                with self._cond:
                    if self._ready_calls():
                        break
                    self._drop_cancelled()
                    if not self._draining():
                        self._admit(runner)
                    if not (self._decoding or self._prefilling):
                        break
                self._step(runner)

    # ================================================================== one step
    def _admit(self, runner: ModelRunner) -> None:
        """Hold ``_cond``. Waiting rows take the lowest free slots."""
        used = {row.slot for row in self._decoding} | {row.slot for row in self._prefilling}
        free = (slot for slot in range(self.max_rows) if slot not in used)
        while self._waiting and len(self._decoding) + len(self._prefilling) < self.max_rows:
            row = self._waiting.popleft()
            if row.handle.done:
                continue
            self._prefilling.append(row)  # first, so a failure below fails its caller instead of losing it
            runner.place(row, next(free))
            self.stats["rows_admitted"] += 1

    def _step(self, runner: ModelRunner) -> None:
        self.stats["steps"] += 1
        if self._prefilling:
            self._prefill(runner)
        if self._decoding and not self._newcomers_first():
            self._decode(runner)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(self._decoding))

    def _newcomers_first(self) -> bool:
        """Whether rows that arrived during this step's prefill are prefilled next, before the running
        rows' next token: a burst of requests then gets its first tokens one decode step sooner each
        (vLLM's default order). The running rows wait one step, never two in a row."""
        with self._cond:
            room = len(self._decoding) + len(self._prefilling) < self.max_rows
            defer = bool(self._waiting) and room and not self._draining() and not self._deferred
        self._deferred = defer
        if defer:
            self.stats["decodes_deferred"] += 1
        return defer

    def _prefill(self, runner: ModelRunner) -> None:
        """One chunk for the oldest rows still reading their prompt, within the token budget.

        A row whose prompt starts with a shared prefix (a chat template's turns) copies its keys and
        values from the prefix cache; on a miss the first such row computes just the prefix this
        step (so it is cached after it) and the others with the same prefix wait one step for it.
        """
        chosen, chunks, width, computing = [], [], 0, set()
        for row in self._prefilling:
            limit = len(row.prompt)
            key = runner.prefix_key(row)
            if key is not None and not runner.reuse_prefix(row):
                if key in computing:
                    continue
                computing.add(key)
                limit = row.prefix_len = len(row.request.prefix)
            take = min(limit - row.cached, self.prefill_chunk)
            if chosen and (len(chosen) + 1) * max(width, take) > self.prefill_chunk:
                break
            chosen.append(row)
            chunks.append(row.prompt[row.cached:row.cached + take])
            width = max(width, take)
        if not chosen:
            return
        self.stats["prefill_steps"] += 1
        try:
            logits = runner.forward(chosen, chunks)
        except Exception as exc:
            for row in chosen:
                self._fail(row, exc)
            return
        done = [i for i, row in enumerate(chosen) if row.prefilled]
        for row in chosen:
            runner.remember_prefix(row)
        if done:
            picks = pick_tokens(logits[done], [chosen[i].sampling for i in done], [chosen[i].tokens for i in done])
            for i, pick in zip(done, picks, strict=True):
                row = chosen[i]
                self._prefilling.remove(row)
                if self._advance(row, pick):
                    self._join_decoding(runner, row)

    def _join_decoding(self, runner: ModelRunner, row: Row) -> None:
        target = len(self._decoding)
        holder = next((r for r in self._prefilling if r.slot == target), None)
        if row.slot != target:
            if holder is not None:
                runner.swap(row, holder)
            else:
                runner.move(row, target)
        self._decoding.append(row)

    def _decode(self, runner: ModelRunner) -> None:
        rows = self._decoding
        self.stats["decode_steps"] += 1
        try:
            logits = runner.forward(rows, [[row.tokens[-1]] for row in rows], slots=slice(0, len(rows)))
        except Exception as exc:
            for row in list(rows):
                self._fail(row, exc)
            return
        picks = pick_tokens(logits, [row.sampling for row in rows], [row.tokens for row in rows])
        ended = [row for row, pick in zip(rows, picks, strict=True) if not self._advance(row, pick)]
        for row in sorted(ended, key=lambda r: r.slot, reverse=True):
            self._leave_decoding(runner, row)

    def _leave_decoding(self, runner: ModelRunner, row: Row) -> None:
        last = self._decoding.pop()
        if last is not row:
            slot = row.slot
            runner.move(last, slot)
            self._decoding[slot] = last

    # ================================================================== rows
    def _advance(self, row: Row, pick: Pick) -> bool:
        """Append the picked token; tell the caller; return whether the row goes on."""
        handle, params, token = row.handle, row.params, pick.token
        if handle.first_token_at is None:
            handle.first_token_at = time.perf_counter()
        row.tokens.append(token)
        row.sampling.accept(token, row.tokens)
        if row.logprobs is not None:
            row.logprobs.append((token, pick.logprob, pick.top or []))
        if row.entropies is not None:
            row.entropies.append(pick.entropy)
        if token in params.eos_ids:
            row.finish_reason = FINISH_STOP
            piece = ""
        else:
            piece = row.text.push(token)
            if row.text.stopped or (row.sampling.constraint is not None and row.sampling.constraint.done):
                row.finish_reason = FINISH_STOP
            elif len(row.tokens) >= params.max_new_tokens:
                row.finish_reason = FINISH_LENGTH
        if row.finished:
            piece += row.text.finish()
        handle.push(Event(row.index, piece, [token], row.logprobs[-1:] if row.logprobs is not None else None,
                          row.finish_reason))
        if row.finished:
            handle.row_finished()
        return not row.finished

    def _fail(self, row: Row, error: BaseException) -> None:
        """End every row of ``row``'s request with ``error``."""
        handle = row.handle
        handle.fail(error)
        for other in handle.rows:
            other.finish_reason = other.finish_reason or FINISH_CANCELLED
        self._remove_finished()

    def _drop_cancelled(self) -> None:
        """Hold ``_cond``. Rows whose caller went away leave now."""
        if not any(r.handle.cancelled for r in [*self._decoding, *self._prefilling, *self._waiting]):
            return
        for row in [*self._decoding, *self._prefilling, *self._waiting]:
            if row.handle.cancelled and not row.finished:
                row.finish_reason = FINISH_CANCELLED
                row.handle.push(Event(row.index, "", [], None, FINISH_CANCELLED))
                row.handle.row_finished()
        self._remove_finished()

    def _remove_finished(self) -> None:
        with self._cond:
            self._waiting = deque(r for r in self._waiting if not r.finished)
            self._prefilling = [r for r in self._prefilling if not r.finished]
            for row in sorted((r for r in self._decoding if r.finished), key=lambda r: r.slot, reverse=True):
                if self._runner is not None:
                    self._leave_decoding(self._runner, row)
                else:
                    self._decoding.remove(row)

    def _fail_running(self, error: BaseException) -> None:
        with self._cond:
            for row in [*self._decoding, *self._prefilling]:
                row.handle.fail(error)
                row.finish_reason = row.finish_reason or FINISH_CANCELLED
            self._decoding, self._prefilling = [], []
