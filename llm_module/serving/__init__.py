"""The serving core: every generation as rows of one continuously batched step loop.

A request's path, top to bottom: ``core.py`` (the front: build, start, results) ->
``intake.py`` (validation into a ``Request``) -> ``scheduler.py`` (admission, prefill chunks,
decode steps, finishing rows) -> ``runner.py`` (one forward over rows, with ``kv_cache.py`` and
per-row adapters) -> ``sampling.py`` (each row's next token) -> ``text.py`` (each row's text,
stop strings) -> back to the caller through ``request.py``'s handle. ``beam.py`` is the one
separate path (beam search).
"""

from .core import ServingCore
from .request import Event, Request, RequestHandle, RowOutput

__all__ = ["Event", "Request", "RequestHandle", "RowOutput", "ServingCore"]
