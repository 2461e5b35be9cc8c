"""What the serving core runs: a request of one or more rows, and the handle its caller waits on.

A ``Request`` is one generate call after validation: prompts already tokenized, sampling
parameters resolved, an adapter chosen. It becomes one ``Row`` per (prompt, returned sequence);
rows are what the scheduler batches. The caller holds a ``RequestHandle``: ``result()`` waits for
every row, ``events()`` yields each row's text as it is decoded (a stream), and closing that
iterator or calling ``cancel()`` frees the rows at the next step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..options import SamplingParams
from .sampling import RowSampling
from .text import TextAssembler

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"


@dataclass
class Request:
    """One validated generate call."""

    prompts: list[list[int]]  # token ids per prompt
    params: list[SamplingParams]  # per prompt (lengths are resolved against each prompt's own)
    adapter: str | None = None
    num_sequences: int = 1  # returned sequences per prompt
    prefix: list[int] = field(default_factory=list)  # tokens every prompt starts with (the prefix cache's key)
    constraint: Any = None  # a factory of per-row constraints (structured output), or None

    @property
    def size(self) -> int:
        return len(self.prompts) * self.num_sequences


@dataclass
class RowOutput:
    """One finished row: its text, tokens, why it ended, and the scores asked for."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list | None = None  # per token: (token, logprob, [(alt, logprob), ...])
    entropies: list[float] | None = None


@dataclass
class Event:
    """A piece of one row's output as it is decoded (``finish_reason`` set on its last piece)."""

    row: int
    text: str
    token_ids: list[int]
    logprobs: list | None = None
    finish_reason: str | None = None


class Row:
    """One sequence being generated: its prompt, its slot in the batch, what it produced so far."""

    def __init__(self, request: Request, handle: RequestHandle, index: int, prompt: list[int],
                 params: SamplingParams, sampling: RowSampling, text: TextAssembler) -> None:
        self.request, self.handle, self.index = request, handle, index
        self.prompt = prompt
        self.params = params
        self.adapter = request.adapter
        self.sampling = sampling
        self.text = text
        self.tokens: list[int] = []
        self.logprobs: list | None = [] if params.logprobs is not None else None
        self.entropies: list[float] | None = [] if params.entropy else None
        self.slot: int | None = None
        self.cached = 0  # positions of this row whose keys and values are in its slot
        self.finish_reason: str | None = None
        self.prefix_len = 0  # leading prompt tokens shared with others (a prefix-cache entry), 0 if none

    @property
    def length(self) -> int:
        """Tokens of prompt and answer (the next position to fill is ``length`` once prefilled)."""
        return len(self.prompt) + len(self.tokens)

    @property
    def prefilled(self) -> bool:
        return self.cached >= len(self.prompt)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def output(self) -> RowOutput:
        return RowOutput(self.text.text, list(self.tokens), self.finish_reason or FINISH_CANCELLED,
                         len(self.prompt), self.logprobs, self.entropies)


class RequestHandle:
    """The caller's side of a request: wait for the outputs, or read them as a stream."""

    def __init__(self, request: Request, stream: bool = False) -> None:
        self.request = request
        self.rows: list[Row] = []
        self.stream = stream
        self._events: queue.SimpleQueue | None = queue.SimpleQueue() if stream else None
        self._done = threading.Event()
        self._cancelled = threading.Event()
        self.error: BaseException | None = None
        self.first_token_at: float | None = None

    # ---- the scheduler's side
    def push(self, event: Event) -> None:
        if self._events is not None:
            self._events.put(event)

    def fail(self, error: BaseException) -> None:
        if not self._done.is_set():
            self.error = error
            self._finish()

    def row_finished(self) -> None:
        if all(row.finished for row in self.rows):
            self._finish()

    def _finish(self) -> None:
        self._done.set()
        if self._events is not None:
            self._events.put(None)

    # ---- the caller's side
    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating: the rows leave the batch at the next step."""
        self._cancelled.set()

    def result(self, timeout: float | None = None) -> list[RowOutput]:
        if not self._done.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        if self.error is not None:
            raise self.error
        return [row.output() for row in self.rows]

    def events(self) -> Iterator[Event]:
        """Each row's pieces as they are decoded; closing the iterator cancels the request."""
        if self._events is None:
            raise RuntimeError("events() needs a request submitted with stream=True")
        try:
            while True:
                event = self._events.get()
                if event is None:
                    break
                yield event
            if self.error is not None:
                raise self.error
        finally:
            if not self._done.is_set():
                self.cancel()
