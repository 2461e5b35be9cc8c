"""Request bodies of the HTTP API (pydantic 1): they are the OpenAPI schema clients see."""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, Extra, Field


class GenerateBody(BaseModel):
    """One generate call; any other transformers generation option may be added by name."""

    prompt: Union[str, list[str]] | None = Field(None, description="A prompt, or a list of prompts.")
    messages: list[dict[str, str]] | None = Field(None, description="Chat turns [{role, content}], instead of prompt.")
    chat: bool = Field(False, description="Wrap prompt in the model's chat template.")
    system_prompt: str | None = None
    adapter: str | None = Field(None, description="Adapter name; 'base' for none; omitted: the default adapter.")
    max_new_tokens: int | None = Field(None, ge=1)
    do_sample: bool | None = None
    temperature: float | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    num_return_sequences: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: Union[str, list[str]] | None = None
    return_full_text: bool | None = None

    class Config:
        extra = Extra.allow

    def options(self) -> dict:
        return {k: v for k, v in self.dict().items() if v is not None and not (k == "chat" and v is False)}


class LoadAdapterBody(BaseModel):
    path: str = Field(..., description="Adapter folder (inside the data root when one is set).")
    name: str | None = Field(None, description="Name to load it under (default: its folder name).")
    make_default: bool = False


class TrainBody(BaseModel):
    data_file: str
    output_dir: str
    training_params: dict[str, Any] | None = None
    resume_from_checkpoint: Union[bool, str] = False
    adapter_name: str | None = None

    class Config:
        extra = Extra.allow


class EvaluateBody(BaseModel):
    data_file: str
    adapter: str | None = None

    class Config:
        extra = Extra.allow
