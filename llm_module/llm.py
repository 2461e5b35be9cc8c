"""Jaseci action set ``llm``, over the process-wide engine.

Load it with ``actions load local llm_module/llm.py`` or ``actions load module llm_module.llm``.
Each action is one line: the work, checks included, is in ``llm_module.actions`` (shared with the
HTTP service, which serves the same table remotely), and this is the only module that imports
jaseci.
"""

from __future__ import annotations

import threading
from typing import Any

from jaseci.jsorc.live_actions import jaseci_action

from llm_module import actions
from llm_module.engine import Engine

_engine: Engine | None = None
_engine_lock = threading.Lock()


def default_engine() -> Engine:
    """The engine the actions of this process use (jaseci's module reloads keep it)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = Engine()
        return _engine


@jaseci_action(act_group=["llm"], allow_remote=True)
def setup(model_name: str = None, lora_dir: str = None, tokenizer_name: str = None, **kwargs) -> dict:
    """Load the base model (default: SmolLM2-135M-Instruct, offline) and adapters; no arguments: restore."""
    return actions.setup(default_engine(), model_name, lora_dir, tokenizer_name, **kwargs)


@jaseci_action(act_group=["llm"], allow_remote=True)
def generate(prompt: Any = None, **kwargs) -> list:
    """``[{"generated_text": ...}]`` per prompt; see the README for every option."""
    return actions.generate(default_engine(), prompt, **kwargs)


@jaseci_action(act_group=["llm"], allow_remote=True)
def train(data_file: str, output_dir: str, training_params: dict = None, resume_from_checkpoint: Any = False,
          **kwargs) -> dict:
    """LoRA-train an adapter on ``data_file`` into ``output_dir``; it is live at once."""
    return actions.train(default_engine(), data_file, output_dir, training_params, resume_from_checkpoint, **kwargs)


@jaseci_action(act_group=["llm"], allow_remote=True)
def evaluate(data_file: str, adapter: str = None, **kwargs) -> dict:
    """Loss, perplexity and token count of the base model or an adapter on ``data_file``."""
    return actions.evaluate(default_engine(), data_file, adapter, **kwargs)


@jaseci_action(act_group=["llm"], allow_remote=True)
def export(adapter: str, output_dir: str, format: str = "gguf", **kwargs) -> dict:  # noqa: A002
    """Merge an adapter into the base and write it as hf / gguf (+ Ollama Modelfile), or as a llama.cpp lora-gguf."""
    return actions.export(default_engine(), adapter, output_dir, format, **kwargs)


@jaseci_action(act_group=["llm"], allow_remote=True)
def load_adapter(path: str, name: str = None, make_default: bool = False) -> dict:
    """Load a LoRA adapter folder under a name (default: the folder's name)."""
    return actions.load_adapter(default_engine(), path, name, make_default)


@jaseci_action(act_group=["llm"], allow_remote=True)
def unload_adapter(name: str) -> dict:
    """Unload a loaded adapter and free its memory."""
    return actions.unload_adapter(default_engine(), name)


@jaseci_action(act_group=["llm"], allow_remote=True)
def list_adapters() -> list:
    """The loaded adapters, with their paths and which one is the default."""
    return actions.list_adapters(default_engine())


@jaseci_action(act_group=["llm"], allow_remote=True)
def set_default_adapter(name: str = None) -> dict:
    """The adapter generate uses when none is named (None: the base model)."""
    return actions.set_default_adapter(default_engine(), name)


@jaseci_action(act_group=["llm"], allow_remote=True)
def job_status(job_id: str) -> dict:
    """A background job's state, progress and result."""
    return actions.job_status(default_engine(), job_id)


@jaseci_action(act_group=["llm"], allow_remote=True)
def cancel_job(job_id: str) -> dict:
    """Ask a running job to stop."""
    return actions.cancel_job(default_engine(), job_id)


@jaseci_action(act_group=["llm"], allow_remote=True)
def list_jobs() -> list:
    """Every job this process knows, oldest first."""
    return actions.list_jobs(default_engine())


@jaseci_action(act_group=["llm"], allow_remote=True)
def model_info() -> dict:
    """What is loaded: model, device, dtype, adapters (does not load anything)."""
    return actions.model_info(default_engine())


@jaseci_action(act_group=["llm"], allow_remote=True)
def augment(data_file: str, output_file: str, methods: list = None, copies: int = 1, seed: int = 0,
            adapter: str = None, **kwargs) -> dict:
    """Write data_file's records plus copies whose prompts are rewritten (synonym, shuffle, paraphrase)."""
    return actions.augment(default_engine(), data_file, output_file, methods, copies, seed, adapter, **kwargs)


@jaseci_action(act_group=["llm"], allow_remote=True)
def select_informative(data_file: str, k: int = 10, strategy: str = "entropy", adapter: str = None,
                       output_file: str = None, **kwargs) -> dict:
    """The k unlabelled records the model is least sure of (entropy or perplexity of its own answer)."""
    return actions.select_informative(default_engine(), data_file, k, strategy, adapter, output_file, **kwargs)
