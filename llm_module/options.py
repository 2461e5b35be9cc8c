"""Generation options and per-request caps: one schema for the actions, the HTTP bodies and the core.

``OPTIONS`` lists every sampling option a generate call takes, with its type and range; the
engine validates kwargs against it (``parse_options``), the HTTP request models are built from it
(server/schemas.py), and ``Limits`` owns every cap a deployment puts on a request. Defaults follow
the transformers text-generation pipeline that the seed module (``jac_nlp.llm``) wrapped, so
tutorial walkers get what they always got.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInput, PayloadTooLarge, suggest

# The text-generation pipeline's defaults (transformers 5.x).
PIPELINE_DEFAULTS = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}


@dataclass(frozen=True)
class Option:
    """One sampling option: its type, its valid range and what it does."""

    name: str
    kind: type  # int, float or bool
    doc: str
    low: float | None = None  # inclusive unless low_open
    high: float | None = None  # inclusive
    low_open: bool = False
    beams_only: bool = False  # only meaningful with num_beams > 1

    def check(self, value: Any) -> Any:
        if self.kind is bool:
            if not isinstance(value, bool):
                raise InvalidInput(f"{self.name} must be true or false, got {value!r}.")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            noun = "an integer" if self.kind is int else "a number"
            raise InvalidInput(f"{self.name} must be {noun}, got {value!r} ({type(value).__name__}).")
        if self.kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise InvalidInput(f"{self.name} must be an integer, got {value!r}.")
            value = int(value)
        else:
            value = float(value)
        if self.name == "temperature" and value <= 0:
            raise InvalidInput("temperature must be > 0; for deterministic output use do_sample=False.")
        if self.low is not None and self.high is not None:
            bracket = "(" if self.low_open else "["
            if (value <= self.low if self.low_open else value < self.low) or value > self.high:
                raise InvalidInput(f"{self.name} must be in {bracket}{_num(self.low)}, {_num(self.high)}], "
                                   f"got {_num(value)}.")
        elif self.low is not None and (value <= self.low if self.low_open else value < self.low):
            raise InvalidInput(f"{self.name} must be {'>' if self.low_open else '>='} {_num(self.low)}, got "
                               f"{_num(value)}.")
        return value


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("max_new_tokens", int, "Most tokens to generate (capped to the model's context).", low=1),
    Option("max_length", int, "Most tokens of prompt plus answer, as transformers counts it.", low=1),
    Option("min_new_tokens", int, "End-of-sequence is held back until this many tokens.", low=0),
    Option("min_length", int, "End-of-sequence is held back until prompt plus answer have this many tokens.", low=0),
    Option("do_sample", bool, "Sample (true) or pick the most likely token (false: greedy)."),
    Option("temperature", float, "Sampling temperature.", low=0, low_open=True),
    Option("top_p", float, "Nucleus sampling: keep the most likely tokens up to this probability.",
           low=0, high=1, low_open=True),
    Option("top_k", int, "Keep only the k most likely tokens (0: all).", low=0),
    Option("min_p", float, "Drop tokens less likely than min_p times the most likely one.", low=0, high=1),
    Option("typical_p", float, "Locally typical sampling mass.", low=0, high=1, low_open=True),
    Option("repetition_penalty", float, "Penalty for tokens already in the prompt or answer (1.0: none).",
           low=0, low_open=True),
    Option("presence_penalty", float, "OpenAI's: subtracted once from the logit of each token already generated.",
           low=-2, high=2),
    Option("frequency_penalty", float, "OpenAI's: subtracted per occurrence of a token already generated.",
           low=-2, high=2),
    Option("no_repeat_ngram_size", int, "No n-gram of this size occurs twice (0: off).", low=0),
    Option("num_return_sequences", int, "Answers per prompt.", low=1),
    Option("num_beams", int, "Beam search with this many beams (1: off).", low=1),
    Option("length_penalty", float, "Beam search: exponent on the length when ranking beams.", low=-50, high=50,
           beams_only=True),  # a length to a larger power overflows a float
    Option("early_stopping", bool, "Beam search: stop once num_beams finished candidates exist.", beams_only=True),
)}
# Options the engine handles besides sampling ones (prompt rendering, adapters, output shape).
OWN_OPTIONS = ("prompt", "messages", "chat", "system_prompt", "adapter", "return_full_text", "seed", "stop",
               "json_schema", "logprobs", "top_logprobs")
# transformers GenerationConfig options a walker may know from model.generate, refused by name.
_TRANSFORMERS_ONLY = ("bad_words_ids", "force_words_ids", "diversity_penalty", "num_beam_groups", "penalty_alpha",
                      "epsilon_cutoff", "eta_cutoff", "encoder_repetition_penalty", "suppress_tokens",
                      "begin_suppress_tokens", "sequence_bias", "guidance_scale", "use_cache", "max_time",
                      "stop_strings", "output_scores", "output_logits", "return_dict_in_generate", "streamer",
                      "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model",
                      "generation_config", "pad_token_id", "eos_token_id", "bos_token_id", "cache_implementation",
                      "renormalize_logits", "forced_bos_token_id", "forced_eos_token_id", "low_memory")


@dataclass(frozen=True)
class Limits:
    """Caps a deployment puts on each request (None: no cap). The only owner of these checks."""

    max_new_tokens: int | None = None
    max_prompt_chars: int | None = None
    max_prompts: int | None = None
    max_return_sequences: int | None = None

    @classmethod
    def from_settings(cls, settings) -> Limits:
        return cls(max_new_tokens=settings.max_new_tokens, max_prompt_chars=settings.max_prompt_chars,
                   max_prompts=settings.max_prompts, max_return_sequences=settings.max_return_sequences)

    def check_options(self, options: dict[str, Any], explicit: set[str]) -> None:
        """Refuse options over a cap; an omitted max_new_tokens falls to the cap (``explicit``: given ones)."""
        cap = self.max_new_tokens
        if cap is not None:
            if "max_new_tokens" not in explicit and "max_length" not in explicit:
                options["max_new_tokens"] = min(options.get("max_new_tokens", cap), cap)
            if options.get("max_new_tokens", 0) > cap:
                raise InvalidInput(f"max_new_tokens={options['max_new_tokens']} is over this server's cap of {cap}; "
                                   "ask for fewer.")
            if options.get("max_length", 0) > cap and "max_new_tokens" not in explicit:
                raise InvalidInput(f"max_length={options['max_length']} is over this server's cap of {cap} new "
                                   f"tokens; pass max_new_tokens (at most {cap}) instead.")
        cap = self.max_return_sequences
        if cap is not None:
            for name in ("num_return_sequences", "num_beams"):
                if options.get(name, 1) > cap:
                    raise InvalidInput(f"{name}={options[name]} is over this server's cap of {cap}; ask for fewer.")

    def check_prompts(self, prompts: list[str]) -> None:
        if self.max_prompts and len(prompts) > self.max_prompts:
            raise PayloadTooLarge(f"{len(prompts)} prompts in one call is over the cap of {self.max_prompts}; "
                                  "split them into several calls.")
        for text in prompts:
            if self.max_prompt_chars and isinstance(text, str) and len(text) > self.max_prompt_chars:
                raise PayloadTooLarge(f"A prompt of {len(text)} characters is over the cap of "
                                      f"{self.max_prompt_chars}; shorten it.")

    def check_chat(self, messages: list[dict] | None, system_prompt: str | None) -> None:
        total = len(system_prompt) if isinstance(system_prompt, str) else 0
        total += sum(len(m["content"]) for m in messages or () if isinstance(m.get("content"), str))
        if self.max_prompt_chars and total > self.max_prompt_chars:
            raise PayloadTooLarge(f"The messages and system prompt hold {total} characters, over the cap of "
                                  f"{self.max_prompt_chars}; shorten them.")


def parse_options(kwargs: dict[str, Any], limits: Limits | None = None) -> dict[str, Any]:
    """Check sampling kwargs; return them typed, with the pipeline's defaults and the caps applied."""
    options: dict[str, Any] = {}
    for name, value in kwargs.items():
        option = OPTIONS.get(name)
        if option is None:
            if name in _TRANSFORMERS_ONLY:
                raise InvalidInput(f"Generation option {name!r} is not supported by llm_module; the supported "
                                   f"ones are {', '.join(OPTIONS)} (README, generate).")
            raise InvalidInput(f"Unknown generation option {name!r}.{suggest(name, [*OPTIONS, *OWN_OPTIONS])} "
                               "See the README for the supported options.")
        if value is not None:
            options[name] = option.check(value)
    explicit = set(options)
    if "max_length" not in options:
        options.setdefault("max_new_tokens", PIPELINE_DEFAULTS["max_new_tokens"])
    options.setdefault("do_sample", PIPELINE_DEFAULTS["do_sample"])
    if options["do_sample"]:
        options.setdefault("temperature", PIPELINE_DEFAULTS["temperature"])
    else:  # greedy: sampling knobs have no effect
        for key in ("temperature", "top_p", "top_k", "typical_p", "min_p"):
            options.pop(key, None)
    if options.get("num_beams", 1) == 1:
        for key in ("length_penalty", "early_stopping"):
            options.pop(key, None)
    if limits is not None:
        limits.check_options(options, explicit)
    return options


@dataclass(frozen=True)
class SamplingParams:
    """How one row picks its tokens and when it ends: the validated options of its request."""

    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: and the k most likely
    entropy: bool = False  # record each step's entropy (active learning scores uncertainty with it)
    eos_ids: frozenset[int] = field(default_factory=frozenset)

    @property
    def greedy(self) -> bool:
        return not self.do_sample

    @property
    def needs_warping(self) -> bool:
        return self.do_sample and (self.temperature != 1.0 or self.top_k > 0 or self.top_p < 1.0
                                   or self.min_p > 0.0 or self.typical_p < 1.0)

    @property
    def penalised(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.no_repeat_ngram_size > 0)


def sampling_params(options: dict[str, Any], *, prompt_len: int, context: int, eos_ids: set[int],
                    seed: int | None, stop: list[str], logprobs: int | None = None,
                    entropy: bool = False) -> SamplingParams:
    """One row's parameters: lengths resolved against its prompt and the model's context."""
    if prompt_len >= context:
        raise InvalidInput(f"The prompt is {prompt_len} tokens but the model's context is {context}; "
                           "shorten the prompt.")
    if "max_length" in options and "max_new_tokens" not in options:
        max_new = options["max_length"] - prompt_len
        if max_new < 1:
            raise InvalidInput(f"max_length={options['max_length']} leaves no room after the {prompt_len}-token "
                               "prompt; raise it or pass max_new_tokens instead.")
    else:
        max_new = options["max_new_tokens"]
    min_new = max(options.get("min_new_tokens", 0), options.get("min_length", 0) - prompt_len)
    return SamplingParams(
        max_new_tokens=min(max_new, context - prompt_len), min_new_tokens=max(0, min_new),
        do_sample=options.get("do_sample", False), temperature=options.get("temperature", 1.0),
        top_k=options.get("top_k", 0), top_p=options.get("top_p", 1.0), min_p=options.get("min_p", 0.0),
        typical_p=options.get("typical_p", 1.0), repetition_penalty=options.get("repetition_penalty", 1.0),
        presence_penalty=options.get("presence_penalty", 0.0), frequency_penalty=options.get("frequency_penalty", 0.0),
        no_repeat_ngram_size=options.get("no_repeat_ngram_size", 0), seed=seed, stop=tuple(stop),
        logprobs=logprobs, entropy=entropy, eos_ids=frozenset(eos_ids),
    )


def parse_stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidInput(f"stop must be a string or a list of non-empty strings, got {stop!r}.")
    return stop


SEED_RANGE = (-2**53, 2**53)  # what torch's generators take, and JSON numbers hold exactly


def parse_seed(seed: Any) -> int | None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidInput(f"seed must be an integer, got {seed!r}.")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise InvalidInput(f"seed must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got {seed}.")
    return seed


def parse_messages(messages: Any) -> list[dict]:
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


def parse_logprobs(logprobs: Any, top_logprobs: Any) -> int | None:
    """None (no log-probabilities), or how many alternatives to report beside the chosen token."""
    if logprobs in (None, False) and top_logprobs is None:
        return None
    if top_logprobs is not None and (isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int)
                                     or not 0 <= top_logprobs <= 20):
        raise InvalidInput(f"top_logprobs must be an integer from 0 to 20, got {top_logprobs!r}.")
    if logprobs is True or logprobs is None:
        return top_logprobs or 0
    if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= 20:
        raise InvalidInput(f"logprobs must be true/false or an integer from 0 to 20, got {logprobs!r}.")
    return logprobs
