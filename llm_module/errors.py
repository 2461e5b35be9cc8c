"""Errors the engine raises on purpose.

Each carries an HTTP status so the service can answer 4xx for the caller's
mistakes and 5xx for ours; the message always names the problem and the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LLMError(Exception):
    """Base of every deliberate llm_module error.

    ``to_dict`` is the error body every entry answers with: ``type``, ``message`` and ``status`` (what
    walkers and the /v1 API read) plus OpenAI's ``param`` and ``code`` (what OpenAI clients read).
    """

    status = 500
    kind = "internal_error"
    param: str | None = None  # the request field at fault, when one is

    def to_dict(self) -> dict:
        return error_body(self.status, str(self), self.kind, self.param)


class InvalidInput(LLMError, ValueError):
    status = 400
    kind = "invalid_input"


class Forbidden(LLMError):
    status = 403
    kind = "forbidden"


class NotFound(LLMError, LookupError):
    status = 404
    kind = "not_found"


class Conflict(LLMError):
    status = 409
    kind = "conflict"


class PayloadTooLarge(InvalidInput):
    status = 413
    kind = "payload_too_large"


class NotReady(LLMError):
    status = 503
    kind = "not_ready"


class ModelLoadError(LLMError):
    status = 500
    kind = "model_load_error"


def error_body(status: int, message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"type": kind, "message": message, "status": status, "param": param, "code": kind}}


def suggest(word: str, choices: Iterable[str]) -> str:
    """' Did you mean x?' for the close matches of ``word``, or ''."""
    matches = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(repr(m) for m in matches) + "?"


class Overloaded(LLMError):
    """The serving core's queue is full: the caller should retry after ``retry_after`` seconds."""

    status = 503
    kind = "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def to_dict(self) -> dict:
        body = super().to_dict()
        body["error"]["retry_after"] = self.retry_after
        return body
