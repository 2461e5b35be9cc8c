"""Every setting of llm_module, in one place: ``Settings`` (pydantic), read once and passed down.

Each field is also the environment variable ``LLM_MODULE_<NAME>`` (``LLM_MODULE_HOME``,
``LLM_MODULE_MAX_BATCH``, ...); ``llm-module serve`` builds its flags from these fields (cli.py),
and flags win over the environment. Nothing else in the package reads ``LLM_MODULE_*`` variables:
the engine, the serving core, the model patches and the server all take a ``Settings``.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseSettings, Field, validator

ENV_PREFIX = "LLM_MODULE_"
QUANT_MODES = ("auto", "none", "int8", "int4")


def _default_home() -> Path:
    return Path.home() / ".cache" / "llm_module"


class Settings(BaseSettings):
    """The knobs of the engine, its serving core and ``llm-module serve``."""

    # ---- files
    home: Path = Field(default_factory=_default_home,
                       description="llm_module's own files: the remembered setup, job records, caches.")
    cache: Path | None = Field(None, description="Converted models and packed weights (default: <home>/models).")
    data_root: Path | None = Field(
        None, description="Every file path a caller gives must lie inside this folder (None: no confinement).")

    # ---- the model
    model: str | None = Field(None, description="Base model to load at start (None: the bundled default).")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="Adapters to load at start, {name: path} (env: JSON object).")
    adapters_dir: Path | None = Field(
        None, description="Adapter folder shared by replicas: each adapter folder in it is served under its "
                          "folder name, loaded at start or on first use (relative: to data_root).")
    adapters_poll_s: float = Field(0.0, ge=0, description="Re-scan adapters_dir every N seconds (0: only at start "
                                   "and on POST /v1/adapters/reload).")
    max_loaded_adapters: int = Field(
        64, ge=1, description="Adapters held in memory at once; past it the least recently used one that "
                              "adapters_dir can bring back is unloaded.")
    allow_pickle_adapters: bool = Field(
        False, description="Also load adapters saved as pickle files (adapter_model.bin), read with torch's "
                           "weights_only loader; off: only safetensors, which cannot run code.")
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda, cuda:N.")
    dtype: str = Field("auto", description="auto, float32, bfloat16 or float16.")
    quantize: str = Field("auto", description="Weight-only quantization of the served copy: auto (int4 for 4-bit "
                                              "GGUF models on a CPU), none, int8 or int4.")
    dense_prefill: bool = Field(False, description="Also keep a bf16 copy of int4 weights for long prompts "
                                                   "(faster prefill, more memory, bf16 rounding).")
    int4_kernel: bool = Field(True, description="Use llm_module's own int4 CPU kernel where it is built.")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads (0: one per core this process may use).")

    # ---- the serving core (continuous batching)
    max_batch: int = Field(16, ge=1, description="Rows (prompts x sequences) decoded together.")
    max_queued: int = Field(256, ge=0, description="Rows waiting for a place in the batch; past it requests "
                                                   "are refused with 503 and a Retry-After hint.")
    prefill_chunk: int = Field(256, ge=16, description="Prompt tokens (padded) run in one prefill step, so a long "
                                                       "prompt does not stall the running rows for its whole length.")
    prefix_cache: bool = Field(True, description="Reuse the keys and values of shared chat-template turns.")

    # ---- caps on each request (one owner: llm_module.options.Limits)
    max_prompt_chars: int = Field(32_000, ge=1)
    max_new_tokens: int = Field(1024, ge=1)
    max_return_sequences: int = Field(8, ge=1, description="Also caps num_beams.")
    max_prompts: int = Field(256, ge=1, description="Prompts in one generate call.")

    # ---- jobs
    resume_interrupted_jobs: bool = Field(
        False, description="At start-up, resume training jobs a previous process left running.")

    # ---- the HTTP service
    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 in the container).")
    port: int = Field(8000, ge=0, le=65535)
    preload: bool = Field(True, description="Load the model in the background at start-up.")
    token: str | None = Field(
        None, description="Shared secret: Authorization: Bearer <token>, or the URL prefix /t/<token>/.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body accepted.")
    threads: int = Field(32, ge=1, description="Worker threads that run blocking engine calls.")
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

    @validator("home", "cache")
    def _expand(cls, value: Path | None) -> Path | None:  # noqa: N805
        return value.expanduser() if value is not None else None

    @validator("quantize")
    def _known_quantize(cls, value: str) -> str:  # noqa: N805
        value = (value or "auto").lower()
        if value not in QUANT_MODES:
            raise ValueError(f"quantize must be one of {', '.join(QUANT_MODES)}, got {value!r}.")
        return value

    @property
    def models_dir(self) -> Path:
        """Where converted models and packed weights are cached."""
        return self.cache or self.home / "models"

    def public_dict(self) -> dict:
        """The settings with the token masked, for logs and /v1/settings."""
        values = self.dict()
        values["token"] = "***" if self.token else None
        for key in ("home", "cache", "data_root", "adapters_dir"):
            values[key] = str(values[key]) if values[key] is not None else None
        return values


def child_process_env(settings: Settings) -> dict[str, str]:
    """Environment for a process of ours (a training worker) that must see the same files."""
    env = dict(os.environ)
    env[ENV_PREFIX + "HOME"] = str(settings.home)
    env[ENV_PREFIX + "CACHE"] = str(settings.models_dir)
    return env
