"""Service settings: command-line flags over ``LLM_MODULE_*`` environment variables over defaults."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseSettings, Field, validator

from llm_module.generation import Limits

ENV_PREFIX = "LLM_MODULE_"


class Settings(BaseSettings):
    """Every knob of ``llm-module serve``; each is also the env var ``LLM_MODULE_<NAME>``."""

    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 in the container).")
    port: int = Field(8000, ge=0, le=65535)
    model: str | None = Field(None, description="Base model to load at start (None: the bundled default).")
    adapters: dict[str, str] = Field(
        default_factory=dict, description='Adapters to load at start, {name: path} (env: JSON object).')
    adapters_dir: Path | None = Field(
        None, description="Shared adapter folder (scale-out): each adapter folder in it loads at start under its "
                          "folder name; POST /v1/adapters/reload loads what changed (relative: to data_root).")
    adapters_poll_s: float = Field(0.0, ge=0, description="Re-scan adapters_dir every N seconds (0: only at start "
                                   "and on POST /v1/adapters/reload).")
    preload: bool = Field(True, description="Load the model in the background at start-up.")
    device: str = "auto"
    dtype: str = "auto"
    data_root: Path | None = Field(
        None, description="Every file path a caller gives must lie inside this folder (None: no confinement).")
    token: str | None = Field(
        None, description="Shared secret: Authorization: Bearer <token>, or the URL prefix /t/<token>/.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body accepted.")
    max_prompt_chars: int = Field(32_000, ge=1)
    max_new_tokens: int = Field(1024, ge=1)
    max_return_sequences: int = Field(8, ge=1)
    max_prompts: int = Field(64, ge=1, description="Prompts in one generate call.")
    batching: bool = Field(True, description="Micro-batch concurrent generate calls into one forward pass.")
    batch_window_ms: float = Field(5.0, ge=0, description="How long a batch waits for more requests.")
    max_batch: int = Field(16, ge=1, description="Rows (prompts x sequences) in one forward pass.")
    threads: int = Field(32, ge=1, description="Worker threads that run blocking engine calls.")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads (0: torch's default).")
    ready_timeout_s: float = Field(
        120.0, ge=0, description="How long an action waits for the start-up load before answering 503.")
    log_level: str = "info"

    class Config:
        env_prefix = ENV_PREFIX
        validate_assignment = True

    @validator("token")
    def _token_not_blank(cls, value: str | None) -> str | None:  # noqa: N805
        if value is not None and not value.strip():
            return None  # an empty LLM_MODULE_TOKEN means "no token", not "the empty token"
        if value is not None and (len(value) < 8 or "/" in value):
            raise ValueError("token must be at least 8 characters and contain no '/'.")
        return value

    @validator("data_root")
    def _data_root_exists(cls, value: Path | None) -> Path | None:  # noqa: N805
        if value is not None:
            value = value.expanduser().resolve()
            if not value.is_dir():
                raise ValueError(f"data_root {str(value)!r} is not a directory.")
        return value

    def limits(self) -> Limits:
        return Limits(
            max_new_tokens=self.max_new_tokens,
            max_prompt_chars=self.max_prompt_chars,
            max_prompts=self.max_prompts,
            max_return_sequences=self.max_return_sequences,
        )

    def public_dict(self) -> dict:
        """The settings with the token masked, for logs and /v1/settings."""
        values = self.dict()
        values["token"] = "***" if self.token else None
        values["data_root"] = str(self.data_root) if self.data_root else None
        return values
