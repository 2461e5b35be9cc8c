"""OpenAI's request bodies (pydantic 1), as far as llm_module serves them.

Fields OpenAI defines that make no sense here are accepted and ignored, as OpenAI-compatible
servers do (``user``, ``metadata``, ``store``, ...); fields with a meaning we cannot honour are
refused by the translation (translate.py) with a message that says so, and the schema says which
values are refused. Unknown fields are ignored. Types are strict, as OpenAI's are: a string where
a number belongs is refused, not converted.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, Extra, Field, conlist

from llm_module.server.schemas import (
    AdapterName,
    EmptyText,
    NonBlank,
    NonEmptyText,
    Seed,
    StrictBool,
    StrictDict,
    StrictText,
    bounded,
    nullable_optionals,
)


class Lenient(BaseModel):
    class Config:
        extra = Extra.ignore
        schema_extra = staticmethod(nullable_optionals)


class EmptyObject(StrictDict):
    """An object that must be empty (or null): a field OpenAI defines that this server cannot honour."""

    @classmethod
    def __modify_schema__(cls, schema: dict) -> None:
        schema.update(type="object", maxProperties=0)


class ContentPart(Lenient):
    type: Literal["text"] = Field(..., description="Only 'text' parts: this model reads no images or audio.")
    text: StrictText | None = None


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[StrictText, list[ContentPart]] | None = None
    name: StrictText | None = None
    tool_call_id: StrictText | None = None
    tool_calls: list[StrictDict] | None = None


class JsonSchemaFormat(Lenient):
    name: StrictText = "response"
    schema_: StrictDict = Field(..., alias="schema", description="The JSON schema the answer follows.")
    strict: StrictBool | None = None
    description: StrictText | None = None


class TextFormat(Lenient):
    type: Literal["text"]


class JsonObjectFormat(Lenient):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(Lenient):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Union[TextFormat, JsonObjectFormat, JsonSchemaResponseFormat]


class StreamOptions(Lenient):
    include_usage: StrictBool = False


class Sampling(Lenient):
    """What chat completions and completions share."""

    model: NonEmptyText = Field(..., description="The base model's name, 'base', or a LoRA adapter's name.")
    max_tokens: bounded(int, ge=1) | None = None
    temperature: bounded(float, ge=0, le=2) | None = Field(None, description="0: greedy.")
    top_p: bounded(float, gt=0, le=1) | None = None
    n: bounded(int, ge=1) = 1
    stop: Union[NonEmptyText, list[NonEmptyText]] | None = None
    seed: Seed | None = None
    presence_penalty: bounded(float, ge=-2, le=2) | None = None
    frequency_penalty: bounded(float, ge=-2, le=2) | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logit_bias: EmptyObject | None = Field(None, description="Not supported: leave it out (or empty).")
    user: StrictText | None = None


def _chat_rules(schema: dict, model: type[BaseModel]) -> None:
    nullable_optionals(schema, model)
    schema["example"] = {"model": "base", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                         "temperature": 0}
    # The translation's cross-field rules (translate.py), so that a request the schema allows is served.
    schema["allOf"] = [
        {"description": "top_logprobs needs logprobs=true.",
         "anyOf": [{"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
                   {"properties": {"top_logprobs": {"enum": [0, None]}}}]},
        {"description": "Tool calling is not supported: no tools, or tool_choice 'none'.",
         "anyOf": [{"properties": {"tools": {"anyOf": [{"type": "null"}, {"maxItems": 0}]}}},
                   {"required": ["tool_choice"], "properties": {"tool_choice": {"const": "none"}}}]},
    ]


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(..., min_items=1)
    max_completion_tokens: bounded(int, ge=1) | None = None
    logprobs: StrictBool = False
    top_logprobs: bounded(int, ge=0, le=20) | None = None
    response_format: ResponseFormat | None = None
    tools: list[StrictDict] | None = None
    tool_choice: Union[StrictText, StrictDict] | None = None

    class Config:
        schema_extra = staticmethod(_chat_rules)


def _completion_example(schema: dict, model: type[BaseModel]) -> None:
    nullable_optionals(schema, model)
    schema["example"] = {"model": "base", "prompt": "The capital of France is", "temperature": 0}


class CompletionRequest(Sampling):
    prompt: Union[NonBlank, conlist(NonBlank, min_items=1)] = Field(..., description="A prompt, or a list of "
                                                                                    "prompts.")
    logprobs: bounded(int, ge=0, le=5) | None = None
    echo: StrictBool = False
    best_of: bounded(int, ge=1) | None = Field(None, description="Only best_of = n is served (no re-ranking).")
    suffix: EmptyText | None = Field(None, description="Not supported: leave it out (or empty).")

    class Config:
        schema_extra = staticmethod(_completion_example)


class LoadLoraAdapterRequest(Lenient):
    lora_name: AdapterName
    lora_path: NonBlank


class UnloadLoraAdapterRequest(Lenient):
    lora_name: StrictText

