"""OpenAI requests to generate calls of the serving core, and its outputs back to OpenAI's objects.

Nothing here generates: a request becomes the keyword arguments of ``ServingCore.build`` (the same
validation every other entry gets), and the core's outputs and events become OpenAI's response,
chunk and usage objects.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from llm_module import __version__
from llm_module.errors import InvalidInput, LLMError
from llm_module.serving import Event, RowOutput

from .schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, Sampling

FINGERPRINT = f"llm_module-{__version__}"


def _refuse(param: str, message: str) -> InvalidInput:
    error = InvalidInput(message)
    error.param = param
    return error


# The engine's names of options that OpenAI names otherwise.
OPENAI_NAMES = {"num_return_sequences": "n", "max_new_tokens": "max_tokens", "json_schema": "response_format"}


def in_openai_terms(error: LLMError) -> LLMError:
    """An engine error about a request, with OpenAI's names for the options (and ``param`` set)."""
    message = str(error)
    for ours, theirs in OPENAI_NAMES.items():
        if message.startswith(ours) or f" {ours}" in message:
            message = message.replace(ours, theirs)
            error.param = error.param or theirs
    error.args = (message,)
    return error


# ------------------------------------------------------------------ requests
def sampling_kwargs(body: Sampling, max_tokens: int | None, default_max: int) -> dict:
    """The sampling options of a request, as the engine names them."""
    if body.logit_bias:
        raise _refuse("logit_bias", "logit_bias is not supported by this server; leave it out.")
    kwargs: dict = {"max_new_tokens": max_tokens or default_max, "num_return_sequences": body.n}
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature == 0:  # OpenAI's greedy
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=temperature)
        if body.top_p is not None:
            kwargs["top_p"] = body.top_p
    for name in ("stop", "seed", "presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value is not None and value != []:
            kwargs[name] = value
    return kwargs


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """OpenAI's message list as the chat template takes it: text content, system/user/assistant roles."""
    turns = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise _refuse(f"messages[{i}].content", "Only text content parts are supported by this model; "
                              "send images and audio to a multimodal server.")
            content = "".join(part.text or "" for part in content)
        if content is None and message.tool_calls:
            content = json.dumps([call.get("function", call) for call in message.tool_calls])
        role = {"developer": "system", "tool": "user"}.get(message.role, message.role)
        if message.role == "tool":
            content = f"Tool result{f' ({message.name})' if message.name else ''}: {content or ''}"
        turns.append({"role": role, "content": content or ""})
    return turns


def chat_kwargs(body: ChatCompletionRequest, default_max: int) -> dict:
    if body.tools and body.tool_choice != "none":
        raise _refuse("tools", "Tool calling is not supported by this server; describe the tools in the prompt "
                      "or ask for a response_format schema instead.")
    kwargs = sampling_kwargs(body, body.max_completion_tokens or body.max_tokens, default_max)
    kwargs["messages"] = chat_messages(body.messages)
    if body.logprobs:
        kwargs["logprobs"] = True
        kwargs["top_logprobs"] = body.top_logprobs or 0
    elif body.top_logprobs:
        raise _refuse("top_logprobs", "top_logprobs needs logprobs=true.")
    schema = response_schema(body)
    if schema is not None:
        kwargs["json_schema"] = schema
    return kwargs


def response_schema(body: ChatCompletionRequest) -> dict | None:
    rf = body.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return {"type": "object"}
    if rf.json_schema is None or rf.json_schema.schema_ is None:
        raise _refuse("response_format.json_schema", "response_format type json_schema needs json_schema.schema.")
    return rf.json_schema.schema_


def completion_kwargs(body: CompletionRequest, default_max: int) -> dict:
    if body.suffix:
        raise _refuse("suffix", "suffix (insertion) is not supported by this model; leave it out.")
    if body.best_of is not None and body.best_of != body.n:
        raise _refuse("best_of", "best_of is not supported; ask for n completions and pick yourself.")
    kwargs = sampling_kwargs(body, body.max_tokens, default_max)
    kwargs["prompt"] = body.prompt
    kwargs["return_full_text"] = False
    if body.logprobs is not None:
        kwargs["logprobs"] = body.logprobs
    return kwargs


# ------------------------------------------------------------------ responses
@dataclass
class Reply:
    """What every response object of one request shares."""

    kind: str  # "chat" or "text"
    model: str
    tokenizer: object
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def object_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.id

    def envelope(self, obj: str) -> dict:
        return {"id": self.object_id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT}

    def usage(self, outputs: list[RowOutput], prompts: int, per_prompt: int) -> dict:
        prompt_tokens = sum(o.prompt_tokens for o in outputs[::per_prompt][:prompts])
        completion = sum(len(o.token_ids) for o in outputs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    # ---- logprobs
    def _token(self, token_id: int) -> tuple[str, list[int]]:
        text = self.tokenizer.decode([token_id])
        return text, list(text.encode("utf-8"))

    def chat_logprobs(self, logprobs: list | None) -> dict | None:
        if logprobs is None:
            return None
        content = []
        for token_id, logprob, top in logprobs:
            text, raw = self._token(token_id)
            content.append({"token": text, "logprob": logprob, "bytes": raw,
                            "top_logprobs": [dict(zip(("token", "bytes"), self._token(t), strict=True),
                                                  logprob=lp) for t, lp in top]})
        return {"content": content}

    def text_logprobs(self, logprobs: list | None, offset: int = 0) -> dict | None:
        if logprobs is None:
            return None
        tokens, values, tops, offsets = [], [], [], []
        for token_id, logprob, top in logprobs:
            text = self._token(token_id)[0]
            offsets.append(offset)
            offset += len(text)
            tokens.append(text)
            values.append(logprob)
            tops.append({self._token(t)[0]: lp for t, lp in top} if top else None)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    # ---- whole responses
    def chat(self, outputs: list[RowOutput]) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": o.text},
                    "logprobs": self.chat_logprobs(o.logprobs), "finish_reason": finish_reason(o.finish_reason)}
                   for i, o in enumerate(outputs)]
        return {**self.envelope("chat.completion"), "choices": choices,
                "usage": self.usage(outputs, 1, len(outputs))}

    def completion(self, outputs: list[RowOutput], prompts: list[str], n: int, echo: bool) -> dict:
        choices = []
        for i, o in enumerate(outputs):
            head = prompts[i // n] if echo else ""
            choices.append({"index": i, "text": head + o.text, "logprobs": self.text_logprobs(o.logprobs, len(head)),
                            "finish_reason": finish_reason(o.finish_reason)})
        return {**self.envelope("text_completion"), "choices": choices,
                "usage": self.usage(outputs, len(prompts), n)}

    # ---- streams
    def chunks(self, events: Iterator[Event], handle, choices: int, include_usage: bool,
               prompts: list[str] | None = None, echo: bool = False) -> Iterator[dict]:
        """OpenAI's chunk objects for a stream of the core's events (then a usage chunk if asked)."""
        chat = self.kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        usage = {"usage": None} if include_usage else {}
        if chat:
            for i in range(choices):
                yield {**self.envelope(obj), **usage, "choices": [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}]}
        elif echo and prompts:
            n = choices // len(prompts)
            for i in range(choices):
                yield {**self.envelope(obj), **usage, "choices": [
                    {"index": i, "text": prompts[i // n], "logprobs": None, "finish_reason": None}]}
        for event in events:
            if not (event.text or event.finish_reason or event.logprobs):
                continue
            reason = finish_reason(event.finish_reason) if event.finish_reason else None
            if chat:
                delta = {"content": event.text} if event.text else {}
                choice = {"index": event.row, "delta": delta, "logprobs": self.chat_logprobs(event.logprobs),
                          "finish_reason": reason}
            else:
                choice = {"index": event.row, "text": event.text, "logprobs": self.text_logprobs(event.logprobs),
                          "finish_reason": reason}
            yield {**self.envelope(obj), **usage, "choices": [choice]}
        if include_usage:
            outputs = handle.result()
            prompt_count = len(prompts) if prompts else 1
            yield {**self.envelope(obj), "choices": [],
                   "usage": self.usage(outputs, prompt_count, len(outputs) // prompt_count)}


def finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"
