"""From a generate call's arguments to a validated ``Request``: prompts, options, adapter.

Everything a caller can get wrong is checked here, before any row reaches the batch, with a
message that names the fix: the prompt or messages, every option (options.py), the caps of the
deployment (options.Limits), the adapter, and the prompt's length against the model's context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import InvalidInput
from ..options import (
    Limits,
    parse_logprobs,
    parse_messages,
    parse_options,
    parse_seed,
    parse_stop,
    sampling_params,
)
from ..prompts import render_prompt, template_prefix
from .request import Request

BEAM_UNSUPPORTED = ("presence_penalty", "frequency_penalty")  # options transformers' generate does not know


@dataclass
class Call:
    """A generate call ready to run: its request, plus what shaping the answer needs."""

    request: Request
    texts: list[str]  # the rendered prompts
    single: bool  # one prompt given, not a list
    return_full_text: bool
    num_beams: int = 1
    beam_options: dict | None = None


def build_call(model, tokenizer, *, limits: Limits, resolve_adapter, prompt: Any = None,
               messages: Any = None, chat: bool = False, system_prompt: Any = None, adapter: Any = None,
               return_full_text: Any = None, seed: Any = None, stop: Any = None, json_schema: Any = None,
               logprobs: Any = None, top_logprobs: Any = None, entropy: bool = False, constraint_factory=None,
               **options: Any) -> Call:
    """Validate a generate call against ``model``/``tokenizer``; ``resolve_adapter(name)`` names the
    adapter a request runs with (None: the base model) or raises NotFound."""
    texts, single, prefix = _prompt_texts(tokenizer, limits, prompt, messages, chat, system_prompt)
    seed = parse_seed(seed)
    stop = parse_stop(stop)
    options = parse_options(options, limits)
    lp = parse_logprobs(logprobs, top_logprobs)
    adapter = resolve_adapter(adapter)
    constraint = None
    if json_schema is not None:
        if constraint_factory is None:
            raise InvalidInput("json_schema needs structured-output support, which this engine lacks.")
        constraint = constraint_factory(json_schema)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    context = context_length(model)
    eos = eos_ids(model, tokenizer)
    params = [sampling_params(options, prompt_len=len(row), context=context, eos_ids=eos,
                              seed=seed if options.get("do_sample") else None, stop=stop, logprobs=lp,
                              entropy=entropy) for row in ids]
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    if prefix_ids and any(row[:len(prefix_ids)] != prefix_ids for row in ids):
        prefix_ids = []  # the template tokenizes differently at the seam: no shared prefix
    request = Request(prompts=ids, params=params, adapter=adapter,
                      num_sequences=options.get("num_return_sequences", 1), prefix=prefix_ids,
                      constraint=constraint)
    templated = bool(chat or messages)
    full = (not templated) if return_full_text is None else bool(return_full_text)
    beam_options = None
    if options.get("num_beams", 1) > 1:
        # OpenAI's penalties are ours, not transformers' (whose beam search runs it): refuse them there.
        penalties = [k for k in BEAM_UNSUPPORTED if options.get(k)]
        if penalties:
            raise InvalidInput(f"{' and '.join(penalties)} cannot be used with beam search (num_beams > 1); use "
                               "repetition_penalty, or sample instead of beam search.")
        beam_options = {k: v for k, v in options.items() if k not in ("num_return_sequences", *BEAM_UNSUPPORTED)}
    return Call(request, texts, single, full, options.get("num_beams", 1), beam_options)


def _prompt_texts(tokenizer, limits: Limits, prompt, messages, chat, system_prompt) -> tuple[list[str], bool, str]:
    """(rendered prompts, whether the caller gave one, the text they all start with)."""
    if messages is not None:
        if prompt not in (None, ""):
            raise InvalidInput("Pass either prompt or messages, not both.")
        messages = parse_messages(messages)
        limits.check_chat(messages, None)
        return [render_prompt(tokenizer, messages)], True, template_prefix(tokenizer, messages)
    single = isinstance(prompt, str)
    prompts = [prompt] if single else prompt
    if not isinstance(prompts, list) or not prompts:
        raise InvalidInput(f"prompt must be a string or a non-empty list of strings, got {prompt!r}.")
    limits.check_prompts(prompts)
    for i, text in enumerate(prompts):
        if not isinstance(text, str) or not text.strip():
            raise InvalidInput(f"prompt{'' if single else f'[{i}]'} is empty or not a string; give some text.")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise InvalidInput(f"system_prompt must be a string, got {system_prompt!r}.")
    if not chat:
        return prompts, single, ""
    limits.check_chat(None, system_prompt)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    rendered = [render_prompt(tokenizer, system + [{"role": "user", "content": p}]) for p in prompts]
    return rendered, single, template_prefix(tokenizer, system + [{"role": "user", "content": ""}])


def context_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 2048)


def eos_ids(model, tokenizer) -> set[int]:
    """The end-of-sequence ids generation stops at, as ``model.generate`` takes them: the generation
    config's (every one of a list), else the model config's, else the tokenizer's."""
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            return set(eos if isinstance(eos, list) else [eos])
    return {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
