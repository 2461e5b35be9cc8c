"""Errors the engine raises on purpose.

Each carries an HTTP status so the service can answer 4xx for the caller's
mistakes and 5xx for ours; the message always names the problem and the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LLMError(Exception):
    """Base of every deliberate llm_module error."""

    status = 500
    kind = "internal_error"

    def to_dict(self) -> dict:
        return {"error": {"type": self.kind, "message": str(self), "status": self.status}}


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


def suggest(word: str, choices: Iterable[str]) -> str:
    """' Did you mean x?' for the close matches of ``word``, or ''."""
    matches = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(repr(m) for m in matches) + "?"
