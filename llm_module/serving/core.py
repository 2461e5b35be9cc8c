"""The serving core's front: a generate call in, rows on the scheduler, the answer out.

    call = core.build(prompt, **options)       # intake.py: validated, tokenized, an adapter chosen
    handle = core.start(call, stream=True)     # rows join the running batch at the next step
    for event in handle.events(): ...          # or handle.result() for the whole answer

``generate`` and ``stream`` wrap those for the engine's actions (the pipeline's result shape);
the OpenAI routes use ``build``/``start`` directly for token counts, log-probabilities and
finish reasons. Beam search takes its own path (beam.py). ``call`` runs other model work on the
model's thread between steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import InvalidInput
from ..options import Limits
from .beam import beam_search
from .intake import Call, build_call, context_length
from .prefix_cache import PrefixCache
from .request import RequestHandle, Row, RowOutput
from .runner import ModelRunner
from .sampling import RowSampling
from .scheduler import Scheduler, Versions
from .text import TextAssembler


class ServingCore:
    def __init__(self, host, adapters, settings, *, constraint_factory: Callable | None = None) -> None:
        """``host``: the model host (``model``, ``tokenizer``, ``version``); ``adapters``: the adapter
        registry (``resolve``, ``names``, ``peft_model``, ``version``)."""
        self.host = host
        self.adapters = adapters
        self.limits = Limits.from_settings(settings)
        self.prefixes = PrefixCache() if settings.prefix_cache else None
        self.constraint_factory = constraint_factory
        self.scheduler = Scheduler(self._build_runner, self._versions, max_rows=settings.max_batch,
                                   max_queued=settings.max_queued, prefill_chunk=settings.prefill_chunk)

    # ------------------------------------------------------------------ wiring to the model
    def _build_runner(self) -> ModelRunner:
        model, tokenizer = self.host.model, self.host.tokenizer
        return ModelRunner(model, slots=self.scheduler.max_rows, context=context_length(model),
                           pad_id=tokenizer.pad_token_id or 0, adapters=self.adapters, prefix_cache=self.prefixes)

    def _versions(self) -> Versions:
        return Versions(self.host.version, self.adapters.version, frozenset(self.adapters.names()))

    # ------------------------------------------------------------------ requests
    def build(self, prompt: Any = None, **kwargs: Any) -> Call:
        """Validate a generate call (raises an LLMError that names the fix)."""
        return build_call(self.host.model, self.host.tokenizer, limits=self.limits,
                          resolve_adapter=self.adapters.resolve, prompt=prompt,
                          constraint_factory=self.constraint_factory, **kwargs)

    def start(self, call: Call, *, stream: bool = False) -> RequestHandle:
        """Queue ``call``'s rows (Overloaded past the queue's bound) and return its handle."""
        if call.num_beams > 1:
            raise InvalidInput("num_beams > 1 runs as a whole, not as rows: use generate(), not a stream.")
        request = call.request
        if request.num_sequences > self.scheduler.max_rows:
            raise InvalidInput(f"num_return_sequences={request.num_sequences} is over the {self.scheduler.max_rows} "
                               "rows this server decodes together; ask for fewer.")
        handle = RequestHandle(request, stream=stream)
        tokenizer = self.host.tokenizer
        rows = []
        for p, (ids, params) in enumerate(zip(request.prompts, request.params, strict=True)):
            for j in range(request.num_sequences):
                seed = None if params.seed is None else params.seed if j == 0 else hash((params.seed, j)) & 0x7FFFFFFF
                constraint = request.constraint() if request.constraint is not None else None
                sampling = RowSampling.create(params, ids, seed, constraint)
                rows.append(Row(request, handle, p * request.num_sequences + j, ids, params, sampling,
                                TextAssembler(tokenizer, params.stop)))
        return self.scheduler.submit(handle, rows)

    def outputs(self, call: Call) -> list[RowOutput]:
        """Run ``call`` to the end: one output per (prompt, sequence), in order."""
        if call.num_beams > 1:
            return self.scheduler.call(lambda: beam_search(self.host.model, self.host.tokenizer, call,
                                                           self.adapters))
        return self.start(call).result()

    # ------------------------------------------------------------------ the actions' shapes
    def generate(self, prompt: Any = None, **kwargs: Any) -> list:
        """``[{"generated_text": ...}]`` for one prompt; one such list per prompt for a list."""
        call = self.build(prompt, **kwargs)
        outputs = self.outputs(call)
        n = call.request.num_sequences
        per_prompt = []
        for p, text in enumerate(call.texts):
            group = outputs[p * n:(p + 1) * n]
            per_prompt.append([{"generated_text": (text + o.text) if call.return_full_text else o.text}
                               for o in group])
        return per_prompt[0] if call.single else per_prompt

    def stream(self, prompt: Any = None, **kwargs: Any) -> TextStream:
        """The completion of one prompt, piece by piece as it is decoded (validated before the first)."""
        call = self.build(prompt, **kwargs)
        if len(call.texts) != 1 or call.request.num_sequences != 1:
            raise InvalidInput("Streaming takes one prompt and num_return_sequences=1.")
        return TextStream(self.start(call, stream=True))

    def call(self, fn: Callable[[], Any], *, drain: bool = False) -> Any:
        return self.scheduler.call(fn, drain=drain)

    def close(self) -> None:
        self.scheduler.stop()


class TextStream:
    """The text pieces of one streamed row, as an iterator; ``close()``, from any thread, cancels the
    row (a reader that went away frees its place in the batch at the next step)."""

    def __init__(self, handle: RequestHandle) -> None:
        self.handle = handle
        self._events = handle.events()

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        for event in self._events:
            if event.text:
                return event.text
        raise StopIteration

    def close(self) -> None:
        self.handle.cancel()
