"""Calls the official ``openai`` client makes against llm_module (run in the client venv, Python 3.12).

    python openai_calls.py BASE_URL API_KEY BASE_MODEL ADAPTER

Prints one JSON object with what each call returned; tests/test_openai.py checks it.
"""

import json
import sys
from enum import StrEnum

from openai import OpenAI
from pydantic import BaseModel

base_url, api_key, base_model, adapter = sys.argv[1:5]
client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
out: dict = {}

out["models"] = [m.id for m in client.models.list()]
messages = [{"role": "user", "content": "Say hello."}]
for name in (base_model, adapter):
    r = client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0)
    out[f"chat:{name}"] = {"text": r.choices[0].message.content, "finish": r.choices[0].finish_reason,
                           "usage": r.usage.model_dump(), "object": r.object, "id": r.id,
                           "fingerprint": r.system_fingerprint}

stream = client.chat.completions.create(model=adapter, messages=messages, max_tokens=8, temperature=0, stream=True,
                                        stream_options={"include_usage": True})
pieces, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage.model_dump()
    for choice in chunk.choices:
        pieces.append(choice.delta.content or "")
        finish = choice.finish_reason or finish
out["chat_stream"] = {"text": "".join(pieces), "usage": usage, "finish": finish, "object": chunk.object}

r = client.chat.completions.create(model=base_model, messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                   top_logprobs=3)
out["chat_logprobs"] = [{"token": t.token, "logprob": t.logprob, "top": len(t.top_logprobs)}
                        for t in r.choices[0].logprobs.content]

r = client.completions.create(model=base_model, prompt=["Hello", "The sky"], max_tokens=5, temperature=0, n=2,
                              logprobs=2)
out["completions"] = {"texts": [c.text for c in r.choices], "usage": r.usage.model_dump(),
                      "tokens": r.choices[0].logprobs.tokens, "finish": [c.finish_reason for c in r.choices]}
stream = client.completions.create(model=base_model, prompt="Hello", max_tokens=5, temperature=0, stream=True)
out["completions_stream"] = "".join(c.choices[0].text for c in stream if c.choices)

r = client.chat.completions.create(model=base_model, messages=messages, max_tokens=6, temperature=0.9, seed=5, n=2)
again = client.chat.completions.create(model=base_model, messages=messages, max_tokens=6, temperature=0.9, seed=5, n=2)
out["seeded"] = [[c.message.content for c in x.choices] for x in (r, again)]


class Color(StrEnum):
    red = "red"
    green = "green"
    blue = "blue"


class Choice(BaseModel):
    color: Color
    sure: bool


for name in (base_model, adapter):
    parsed = client.chat.completions.parse(model=name, messages=[{"role": "user", "content": "Pick a colour."}],
                                           max_tokens=40, temperature=0, response_format=Choice)
    out[f"parsed:{name}"] = parsed.choices[0].message.parsed.model_dump(mode="json")

errors = {}
for label, kwargs in {
    "unknown_model": {"model": "no-such-model"},
    "empty_messages": {"messages": []},
    "wrong_type": {"max_tokens": "many"},
    "n_too_large": {"n": 1000},
    "bad_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "x"}}}},
}.items():
    call = {"model": base_model, "messages": messages, "max_tokens": 4, **kwargs}
    try:
        client.chat.completions.create(**call)
        errors[label] = None
    except Exception as exc:  # the client's typed errors
        body = getattr(exc, "body", None) or {}
        errors[label] = {"status": getattr(exc, "status_code", None), "type": type(exc).__name__,
                         "message": body.get("message") if isinstance(body, dict) else str(body),
                         "param": body.get("param") if isinstance(body, dict) else None}
out["errors"] = errors
print(json.dumps(out))
