"""Generation requests: validating kwargs, building prompts, shaping results.

Defaults follow the transformers text-generation pipeline that the seed module
(``jac_nlp.llm``) wrapped, so tutorial walkers get what they always got.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInput, suggest

# The text-generation pipeline's defaults (transformers 5.x).
PIPELINE_DEFAULTS = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}

# Options handled by llm_module itself rather than GenerationConfig.
OWN_OPTIONS = {"return_full_text", "seed", "stop", "adapter", "chat", "messages", "system_prompt"}

_INT_OPTIONS = {"max_new_tokens", "max_length", "min_new_tokens", "min_length", "top_k", "num_return_sequences",
                "no_repeat_ngram_size", "num_beams"}
_FLOAT_OPTIONS = {"temperature", "top_p", "repetition_penalty", "typical_p", "min_p", "length_penalty"}
# GenerationConfig options that make no sense from a walker (tensors, callables, output plumbing).
_REFUSED = {"output_attentions", "output_hidden_states", "output_scores", "output_logits",
            "return_dict_in_generate", "streamer", "logits_processor", "stopping_criteria",
            "prefix_allowed_tokens_fn", "assistant_model", "synced_gpus", "generation_config",
            "pad_token_id", "eos_token_id", "bos_token_id", "cache_implementation", "compile_config"}


# Options under which a request stopped after some tokens and resumed from them (as part of its
# prompt) continues as it would have: they look at the tokens so far, never at a step count.
_RESUMABLE_OPTIONS = {"max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k",
                      "typical_p", "min_p", "repetition_penalty", "num_return_sequences"}
# When a running batch yields to waiting requests (engine.py): only with this many tokens still to
# go (near its end it finishes), only if re-running its rows' uncached prompt and tokens so far
# costs at most this many tokens (about one prefill of 8 short chat prompts), and at most this
# many times a request.
MIN_TOKENS_LEFT_TO_YIELD = 4
MAX_RERUN_TOKENS_TO_YIELD = 256
MAX_YIELDS = 3


def _generation_config_keys() -> set[str]:
    from transformers import GenerationConfig

    return set(GenerationConfig().to_dict()) - _REFUSED - {"transformers_version", "_from_model_config"}


@dataclass
class Limits:
    """Caps the service applies to each request (None: no cap)."""

    max_new_tokens: int | None = None
    max_prompt_chars: int | None = None
    max_prompts: int | None = None
    max_return_sequences: int | None = None


@dataclass
class GenerationRequest:
    """One validated call of ``generate``: prompts already rendered as text."""

    texts: list[str]
    adapter: str | None
    options: dict[str, Any]
    return_full_text: bool
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    single: bool = True  # the caller gave one prompt, not a list
    prefix: str = ""  # text every prompt starts with (a chat template's turns): its cache is reused
    partial: list[int] = field(default_factory=list)  # tokens generated before a batch yielded (engine.py)
    yields: int = 0  # how many times a batch stopped this request early

    @property
    def num_return_sequences(self) -> int:
        return int(self.options.get("num_return_sequences", 1))

    @property
    def resumable(self) -> bool:
        """Whether a batch may stop this request early and run the rest later: one row, and
        nothing tied to a step count or a seed."""
        return (len(self.texts) == 1 and self.num_return_sequences == 1 and self.seed is None and not self.stop
                and self.yields < MAX_YIELDS and set(self.options) <= _RESUMABLE_OPTIONS)

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one forward pass (adapter may differ)."""
        opts = {k: v for k, v in self.options.items() if k != "num_return_sequences"}
        return (tuple(sorted(opts.items())), tuple(self.stop), self.seed)


def _check_number(name: str, value: Any) -> Any:
    if isinstance(value, bool):
        raise InvalidInput(f"{name} must be a number, got {value!r}.")
    if name in _INT_OPTIONS:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise InvalidInput(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
        minimum = 0 if name in {"min_new_tokens", "min_length", "top_k", "no_repeat_ngram_size"} else 1
        if value < minimum:
            raise InvalidInput(f"{name} must be >= {minimum}, got {value}.")
    elif name in _FLOAT_OPTIONS:
        if not isinstance(value, (int, float)):
            raise InvalidInput(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
        value = float(value)
        if name == "temperature" and value <= 0:
            raise InvalidInput("temperature must be > 0; for deterministic output use do_sample=False.")
        if name in {"top_p", "typical_p", "min_p"} and not 0 < value <= 1:
            raise InvalidInput(f"{name} must be in (0, 1], got {value}.")
        if name == "repetition_penalty" and value <= 0:
            raise InvalidInput(f"repetition_penalty must be > 0 (1.0 means none), got {value}.")
    return value


def validate_options(kwargs: dict[str, Any], limits: Limits | None = None) -> dict[str, Any]:
    """Check generation kwargs; return GenerationConfig options with pipeline defaults applied."""
    allowed = _generation_config_keys()
    options: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name not in allowed:
            raise InvalidInput(
                f"Unknown generation option {name!r}.{suggest(name, allowed | OWN_OPTIONS)} "
                "See the README for the supported options."
            )
        if value is None:
            continue
        if name in _INT_OPTIONS or name in _FLOAT_OPTIONS:
            value = _check_number(name, value)
        elif name == "do_sample" and not isinstance(value, bool):
            raise InvalidInput(f"do_sample must be true or false, got {value!r}.")
        options[name] = value
    if "max_length" not in options:
        options.setdefault("max_new_tokens", PIPELINE_DEFAULTS["max_new_tokens"])
    options.setdefault("do_sample", PIPELINE_DEFAULTS["do_sample"])
    if options["do_sample"]:
        options.setdefault("temperature", PIPELINE_DEFAULTS["temperature"])
    else:
        for key in ("temperature", "top_p", "top_k", "typical_p", "min_p"):
            options.pop(key, None)  # greedy: sampling knobs would only raise warnings
    _apply_limits(options, limits)
    return options


def _apply_limits(options: dict[str, Any], limits: Limits | None) -> None:
    if limits is None:
        return
    cap = limits.max_new_tokens
    if cap is not None and options.get("max_new_tokens", 0) > cap:
        raise InvalidInput(
            f"max_new_tokens={options['max_new_tokens']} is over this server's cap of {cap}; ask for fewer."
        )
    cap = limits.max_return_sequences
    if cap is not None and options.get("num_return_sequences", 1) > cap:
        raise InvalidInput(
            f"num_return_sequences={options['num_return_sequences']} is over this server's cap of {cap}."
        )


def validate_stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidInput(f"stop must be a string or a list of non-empty strings, got {stop!r}.")
    return stop


def validate_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise InvalidInput("messages must be a non-empty list of {'role': ..., 'content': ...} objects.")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or msg.get("role") not in (
            "system", "user", "assistant"
        ):
            raise InvalidInput(
                f"messages[{i}] must be an object with role 'system', 'user' or 'assistant' and a string "
                f"content, got {msg!r}."
            )
    return messages


def cut_at_stop(text: str, stop: list[str]) -> str:
    """Cut ``text`` before the first occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        idx = text.find(s)
        if idx != -1:
            cut = min(cut, idx)
    return text[:cut]


def stop_when(event: threading.Event):
    """Stopping criteria that end generation once ``event`` is set (a stream's reader went away)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _StopWhenSet(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_StopWhenSet()])


def row_budgets(prompt_len: int, budgets: list[int]):
    """Stopping criteria that end row ``i`` after ``budgets[i]`` new tokens (rows resumed with some)."""
    import torch
    from transformers import StoppingCriteria

    limits = torch.tensor(budgets)

    class _RowBudgets(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return (input_ids.shape[1] - prompt_len >= limits).to(input_ids.device)

    return _RowBudgets()


def row_min_new_tokens(prompt_len: int, minimums: list[int], eos_ids: set[int]):
    """A logits processor that keeps row ``i`` from ending before ``minimums[i]`` new tokens.

    It stands in for transformers' own min-length processors, which build a vocabulary-sized mask
    at every step (~0.7 ms of a ~20 ms CPU decoding step); this one touches the end-of-sequence
    columns only, and nothing once every row is past its minimum. Rows beyond ``len(minimums)``
    (beam search expands each row into consecutive beams) share their source row's minimum.
    """
    import torch
    from transformers import LogitsProcessor

    eos, last_needed = sorted(eos_ids), max(minimums, default=0)
    columns: dict = {}  # eos ids as a tensor, per device

    class _RowMinNewTokens(LogitsProcessor):
        def __call__(self, input_ids, scores):
            new_tokens = input_ids.shape[1] - prompt_len
            if not eos or new_tokens >= last_needed:
                return scores
            per_source = input_ids.shape[0] // len(minimums)
            rows = [i for i in range(input_ids.shape[0]) if new_tokens < minimums[i // per_source]]
            if scores.device not in columns:
                columns[scores.device] = torch.tensor(eos, device=scores.device)
            scores = scores.clone()
            scores[torch.tensor(rows, device=scores.device)[:, None], columns[scores.device]] = -float("inf")
            return scores

    return _RowMinNewTokens()


def yield_when_waiting(waiting, rows: int, prompt_len: int, tokens_to_go: int, rerun_tokens: int):
    """Stopping criteria that end a batch of ``rows`` once ``waiting()`` rows could join it.

    Merged into the next batch, the newcomers and the stopped rows share every step after that,
    instead of the newcomers waiting out the whole batch; the stopped rows run their uncached
    prompt (``rerun_tokens`` in all) and their tokens so far again. ``tokens_to_go``: the fewest
    any row has left. Its ``fired`` says whether it stopped the batch.
    """
    import torch
    from transformers import StoppingCriteria

    class _YieldWhenWaiting(StoppingCriteria):
        fired = False

        def __call__(self, input_ids, scores, **kwargs):
            if not self.fired:
                done = input_ids.shape[1] - prompt_len
                self.fired = (tokens_to_go - done >= MIN_TOKENS_LEFT_TO_YIELD
                              and rerun_tokens + rows * done <= MAX_RERUN_TOKENS_TO_YIELD and waiting() > 0)
            return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)

    return _YieldWhenWaiting()
