"""The ``llm`` actions, as plain functions of an engine: one table for every way in.

Each action checks the shape of its input and hands the work to the engine it is given, which
raises errors that name the problem and the fix. ``llm.py`` registers these as Jaseci actions
(over the process-wide engine); the HTTP service serves jaseci's remote-action protocol from this
same table over the engine it was built with, so it needs no jaseci itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .engine import Engine
from .errors import InvalidInput, suggest

SETUP_OPTIONS = ("tokenizer_kwargs", "model_kwargs", "device", "dtype", "quantize", "adapters")
AUGMENT_OPTIONS = ("fields", "rate", "data_format")
SELECT_OPTIONS = ("max_new_tokens", "batch_size", "prompt_template")


def _refuse_unknown(action: str, kwargs: dict, allowed: tuple[str, ...]) -> None:
    for key in kwargs:
        if key not in allowed:
            raise InvalidInput(f"llm.{action} got an unknown option {key!r}.{suggest(key, allowed)} "
                               f"It takes: {', '.join(allowed)}.")


def setup(engine: Engine, model_name: str = None, lora_dir: str = None, tokenizer_name: str = None,
          **kwargs) -> dict:
    """Load the base model (default: SmolLM2-135M-Instruct, offline) and adapters.

    With no arguments at all (what jaseci does when it re-loads the module in a new
    process) it restores the last setup: same model, same adapters.
    """
    _refuse_unknown("setup", kwargs, SETUP_OPTIONS)
    restore = model_name is None and lora_dir is None and tokenizer_name is None and not kwargs
    return engine.setup(model_name, lora_dir, tokenizer_name, restore=restore, **kwargs)


def generate(engine: Engine, prompt: Any = None, **kwargs) -> list:
    """``[{"generated_text": ...}]`` per prompt; see the README for every option."""
    return engine.generate(prompt, **kwargs)


def train(engine: Engine, data_file: str, output_dir: str, training_params: dict = None,
          resume_from_checkpoint: Any = False, **kwargs) -> dict:
    """LoRA-train an adapter on ``data_file`` into ``output_dir``; it is live at once."""
    return engine.train(data_file, output_dir, training_params, resume_from_checkpoint, **kwargs)


def evaluate(engine: Engine, data_file: str, adapter: str = None, **kwargs) -> dict:
    """Loss, perplexity and token count of the base model or an adapter on ``data_file``."""
    return engine.evaluate(data_file, adapter, **kwargs)


def export(engine: Engine, adapter: str, output_dir: str, format: str = "gguf", **kwargs) -> dict:  # noqa: A002
    """Merge an adapter into the base and write it as hf / gguf (+ Ollama Modelfile), or as a llama.cpp lora-gguf."""
    return engine.export(adapter, output_dir, format, **kwargs)


def load_adapter(engine: Engine, path: str, name: str = None, make_default: bool = False) -> dict:
    """Load a LoRA adapter folder under a name (default: the folder's name)."""
    return engine.load_adapter(path, name, replace=False, make_default=make_default)


def unload_adapter(engine: Engine, name: str) -> dict:
    """Unload a loaded adapter and free its memory."""
    return engine.unload_adapter(name)


def list_adapters(engine: Engine) -> list:
    """The loaded adapters, with their paths and which one is the default."""
    return engine.list_adapters()


def set_default_adapter(engine: Engine, name: str = None) -> dict:
    """The adapter generate uses when none is named (None: the base model)."""
    return engine.set_default_adapter(name)


def job_status(engine: Engine, job_id: str) -> dict:
    """A background job's state, progress and result."""
    return engine.job_status(job_id)


def cancel_job(engine: Engine, job_id: str) -> dict:
    """Ask a running job to stop."""
    return engine.cancel_job(job_id)


def list_jobs(engine: Engine) -> list:
    """Every job this process knows, oldest first."""
    return engine.list_jobs()


def model_info(engine: Engine) -> dict:
    """What is loaded: model, device, dtype, adapters (does not load anything)."""
    return engine.describe()


def augment(engine: Engine, data_file: str, output_file: str, methods: list = None, copies: int = 1, seed: int = 0,
            adapter: str = None, **kwargs) -> dict:
    """Write data_file's records plus copies whose prompts are rewritten (synonym, shuffle, paraphrase)."""
    _refuse_unknown("augment", kwargs, AUGMENT_OPTIONS)
    return engine.augment(data_file, output_file, methods, copies, seed, adapter=adapter, **kwargs)


def select_informative(engine: Engine, data_file: str, k: int = 10, strategy: str = "entropy", adapter: str = None,
                       output_file: str = None, **kwargs) -> dict:
    """The k unlabelled records the model is least sure of (entropy or perplexity of its own answer)."""
    _refuse_unknown("select_informative", kwargs, SELECT_OPTIONS)
    return engine.select_informative(data_file, k, strategy, adapter=adapter, output_file=output_file, **kwargs)


ACTIONS: dict[str, Callable] = {
    func.__name__: func
    for func in (setup, generate, train, evaluate, export, load_adapter, unload_adapter, list_adapters,
                 set_default_adapter, job_status, cancel_job, list_jobs, model_info, augment, select_informative)
}
