"""Jaseci action set ``llm``: a thin layer over the process-wide Engine.

Load it with ``actions load local llm_module/llm.py`` or ``actions load module llm_module.llm``;
the HTTP service (``llm-module serve``) exposes these same functions remotely.
Each action checks the shape of its input and hands the work to the engine, which
raises errors that name the problem and the fix.
"""

from __future__ import annotations

from typing import Any

from jaseci.jsorc.live_actions import jaseci_action

from llm_module.engine import default_engine
from llm_module.errors import InvalidInput, suggest

SETUP_OPTIONS = ("tokenizer_kwargs", "model_kwargs", "device", "dtype", "adapters")
AUGMENT_OPTIONS = ("fields", "rate", "data_format")
SELECT_OPTIONS = ("max_new_tokens", "batch_size", "prompt_template")


def _refuse_unknown(action: str, kwargs: dict, allowed: tuple[str, ...]) -> None:
    for key in kwargs:
        if key not in allowed:
            raise InvalidInput(
                f"llm.{action} got an unknown option {key!r}.{suggest(key, allowed)} "
                f"It takes: {', '.join(allowed)}."
            )


@jaseci_action(act_group=["llm"], allow_remote=True)
def setup(model_name: str = None, lora_dir: str = None, tokenizer_name: str = None, **kwargs) -> dict:
    """Load the base model (default: SmolLM2-135M-Instruct, offline) and adapters.

    With no arguments at all (what jaseci does when it re-loads the module in a new
    process) it restores the last setup: same model, same adapters.
    """
    _refuse_unknown("setup", kwargs, SETUP_OPTIONS)
    restore = model_name is None and lora_dir is None and tokenizer_name is None and not kwargs
    return default_engine().setup(model_name, lora_dir, tokenizer_name, restore=restore, **kwargs)


@jaseci_action(act_group=["llm"], allow_remote=True)
def generate(prompt: Any = None, **kwargs) -> list:
    """``[{"generated_text": ...}]`` per prompt; see the README for every option."""
    return default_engine().generate(prompt, **kwargs)


@jaseci_action(act_group=["llm"], allow_remote=True)
def train(
    data_file: str,
    output_dir: str,
    training_params: dict = None,
    resume_from_checkpoint: Any = False,
    **kwargs,
) -> dict:
    """LoRA-train an adapter on ``data_file`` into ``output_dir``; it is live at once."""
    return default_engine().train(data_file, output_dir, training_params, resume_from_checkpoint, **kwargs)


@jaseci_action(act_group=["llm"], allow_remote=True)
def evaluate(data_file: str, adapter: str = None, **kwargs) -> dict:
    """Loss, perplexity and token count of the base model or an adapter on ``data_file``."""
    return default_engine().evaluate(data_file, adapter, **kwargs)


@jaseci_action(act_group=["llm"], allow_remote=True)
def load_adapter(path: str, name: str = None, make_default: bool = False) -> dict:
    return default_engine().load_adapter(path, name, replace=False, make_default=make_default)


@jaseci_action(act_group=["llm"], allow_remote=True)
def unload_adapter(name: str) -> dict:
    return default_engine().unload_adapter(name)


@jaseci_action(act_group=["llm"], allow_remote=True)
def list_adapters() -> list:
    return default_engine().list_adapters()


@jaseci_action(act_group=["llm"], allow_remote=True)
def set_default_adapter(name: str = None) -> dict:
    return default_engine().set_default_adapter(name)


@jaseci_action(act_group=["llm"], allow_remote=True)
def job_status(job_id: str) -> dict:
    return default_engine().job_status(job_id)


@jaseci_action(act_group=["llm"], allow_remote=True)
def cancel_job(job_id: str) -> dict:
    return default_engine().cancel_job(job_id)


@jaseci_action(act_group=["llm"], allow_remote=True)
def list_jobs() -> list:
    return default_engine().list_jobs()


@jaseci_action(act_group=["llm"], allow_remote=True)
def model_info() -> dict:
    """What is loaded: model, device, dtype, adapters (does not load anything)."""
    return default_engine().describe()


@jaseci_action(act_group=["llm"], allow_remote=True)
def augment(data_file: str, output_file: str, methods: list = None, copies: int = 1, seed: int = 0,
            adapter: str = None, **kwargs) -> dict:
    """Write data_file's records plus copies whose prompts are rewritten (synonym, shuffle, paraphrase)."""
    _refuse_unknown("augment", kwargs, AUGMENT_OPTIONS)
    return default_engine().augment(data_file, output_file, methods, copies, seed, adapter=adapter, **kwargs)


@jaseci_action(act_group=["llm"], allow_remote=True)
def select_informative(data_file: str, k: int = 10, strategy: str = "entropy", adapter: str = None,
                       output_file: str = None, **kwargs) -> dict:
    """The k unlabelled records the model is least sure of (entropy or perplexity of its own answer)."""
    _refuse_unknown("select_informative", kwargs, SELECT_OPTIONS)
    return default_engine().select_informative(data_file, k, strategy, adapter=adapter, output_file=output_file,
                                               **kwargs)


ACTIONS = {
    func.__name__: func
    for func in (setup, generate, train, evaluate, load_adapter, unload_adapter, list_adapters,
                 set_default_adapter, job_status, cancel_job, list_jobs, model_info, augment, select_informative)
}
