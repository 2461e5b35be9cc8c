"""Structured output: a row's tokens constrained to JSON that parses and fits a JSON schema.

llguidance (the grammar engine llama.cpp and vLLM use; no dependencies) turns a JSON schema into a
grammar and, at every step, into the set of tokens that can come next. Each constrained row holds
its own matcher: its logits outside that set are masked before sampling (sampling.py), the chosen
token advances the matcher, and the row ends once the grammar is complete. Constrained rows and
free rows share the same batch.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from ..errors import InvalidInput

ANY_JSON_OBJECT = {"type": "object"}


class JsonConstraint:
    """One row's matcher: masks the logits, follows the chosen tokens."""

    def __init__(self, matcher) -> None:
        self.matcher = matcher

    def mask(self, row_logits) -> None:
        import torch

        # The allowed tokens as a little-endian bitmask: bit b of byte i allows token 8 * i + b.
        packed = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
        bits = (packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
        allowed = bits.flatten()[: row_logits.shape[-1]].bool()
        if allowed.shape[0] < row_logits.shape[-1]:  # the model's padded vocabulary: never allowed
            allowed = torch.cat([allowed, allowed.new_zeros(row_logits.shape[-1] - allowed.shape[0])])
        row_logits.masked_fill_(~allowed.to(row_logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but the end of the answer can follow."""
        return self.matcher.is_stopped()


class StructuredOutput:
    """Compiles JSON schemas for the served model's tokenizer (its vocabulary is read once)."""

    def __init__(self, tokenizer_of: Callable[[], Any]) -> None:
        self._tokenizer_of = tokenizer_of  # the current model's tokenizer (it changes with setup)
        self._cached: tuple[Any, Any] | None = None  # (hf tokenizer, its llguidance tokenizer)
        self._lock = threading.Lock()

    def _ll_tokenizer(self):
        import llguidance.hf

        tokenizer = self._tokenizer_of()
        with self._lock:
            if self._cached is None or self._cached[0] is not tokenizer:
                self._cached = (tokenizer, llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer)))
            return self._cached[1]

    def compile(self, schema: Any) -> Callable[[], JsonConstraint]:
        """A factory of per-row constraints for ``schema``; a clear error when it is not a JSON schema."""
        import llguidance

        if schema is True or schema == {}:
            schema = ANY_JSON_OBJECT
        if not isinstance(schema, dict):
            raise InvalidInput(f"json_schema must be a JSON schema object such as {{\"type\": \"object\"}}, got "
                               f"{json.dumps(schema)[:100]}.")
        try:
            # Compact JSON: with free whitespace a weak model can pad an answer with blanks until its
            # token limit (a schema's own "x-guidance" options win).
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False})
        except Exception as exc:
            raise InvalidInput(f"json_schema is not a JSON schema llguidance can use ({exc}); give a JSON schema "
                               "object (https://json-schema.org).") from exc
        tokenizer = self._ll_tokenizer()
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise InvalidInput(f"json_schema is not a usable JSON schema: {error}; give a JSON schema object "
                               "(https://json-schema.org), e.g. {\"type\": \"object\"}.")

        def factory() -> JsonConstraint:
            return JsonConstraint(llguidance.LLMatcher(tokenizer, grammar))

        return factory
