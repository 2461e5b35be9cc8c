"""What the service refuses that an in-process caller may do: model options that run code from a
model folder or read and write outside the data root, a model from outside the data root, and
arguments the engine would take loosely (``chat="yes"``) where the service's schema promises types.

File paths themselves are confined by the engine (its settings' ``data_root``), the one owner of
that rule, and generation caps by ``options.Limits``.
"""

from __future__ import annotations

from typing import Any

from llm_module.errors import Forbidden, InvalidInput
from llm_module.loader import DEFAULT_MODEL
from llm_module.options import OPTIONS, OWN_OPTIONS, parse_options
from llm_module.paths import resolve_user_path

# from_pretrained options that run remote code or read/write outside the data root.
REFUSED_ALWAYS = {"trust_remote_code", "code_revision"}
REFUSED_WITH_ROOT = {"cache_dir", "offload_folder", "gguf_file", "subfolder", "local_dir"}
SETUP_NAMES = ("model_name", "lora_dir", "tokenizer_name")
# Options of llm.generate that the engine reads with bool() or only sometimes: typed here.
GENERATE_FLAGS = ("chat", "return_full_text")
GENERATE_EXTRA = ("entropy",)  # taken by the engine besides OPTIONS and OWN_OPTIONS (active learning)
LAUNCH_INTEGERS = ("num_processes", "nnodes", "node_rank", "master_port")


def check_action(action: str, kwargs: dict, settings) -> dict:
    """Refuse what this server does not allow; return ``kwargs`` unchanged otherwise."""
    if action == "setup":
        _check_setup(kwargs, settings)
    elif action == "generate":
        _check_generate(kwargs)
    elif action == "load_adapter":
        _check_flag("make_default", kwargs.get("make_default"), "load_adapter")
    elif action == "train":
        for key in LAUNCH_INTEGERS:  # 2.0 is the integer 2 in JSON (the launcher takes Python ints only)
            if isinstance(kwargs.get(key), float) and kwargs[key].is_integer():
                kwargs[key] = int(kwargs[key])
    return kwargs


def _check_setup(kwargs: dict, settings) -> None:
    for group in ("model_kwargs", "tokenizer_kwargs"):
        options = kwargs.get(group)
        if not isinstance(options, dict):
            continue
        for key in options:
            if key in REFUSED_ALWAYS:
                raise Forbidden(f"{group}[{key!r}] is refused by this server: it would run code from the model "
                                "folder. Convert the model to a plain transformers architecture instead.")
            if settings.data_root is not None and key in REFUSED_WITH_ROOT:
                raise Forbidden(f"{group}[{key!r}] is refused by this server: it reads or writes files outside "
                                "the data root. Put the model inside the data root and pass its path.")
    for key in ("device", "dtype", "quantize", *SETUP_NAMES):
        if kwargs.get(key) is not None and not isinstance(kwargs[key], str):
            raise InvalidInput(f"setup's {key} must be a string, got {kwargs[key]!r}.")
    if settings.data_root is not None and not is_restore(kwargs):
        _confine_setup(kwargs, settings.data_root)


def is_restore(kwargs: dict) -> bool:
    """A setup with nothing named: the last setup again (what jaseci sends when it re-loads the module)."""
    return all(kwargs.get(name) is None for name in SETUP_NAMES) and not set(kwargs) - set(SETUP_NAMES)


def _confine_setup(kwargs: dict, root) -> None:
    """With a data root, setup loads only what lies inside it: the model too, not the bundled default model
    or a hub download (each outside the data root), nor a name that only exists relative to the server's
    working directory."""
    adapters = kwargs.get("adapters")
    if adapters is not None and not isinstance(adapters, dict):
        raise InvalidInput(f"adapters must be an object {{name: path}}, got {adapters!r}.")
    for name, path in (adapters or {}).items():
        resolve_user_path(path, root, must_exist=False, what=f"adapter {name!r}")
    if kwargs.get("lora_dir"):
        resolve_user_path(kwargs["lora_dir"], root, must_exist=False, what="lora_dir")
    if kwargs.get("tokenizer_name"):
        resolve_user_path(kwargs["tokenizer_name"], root, must_exist=True, what="tokenizer_name")
    model = kwargs.get("model_name")
    if model in (None, "", "default", DEFAULT_MODEL):
        raise Forbidden(f"This server loads models from inside its data root only, and the bundled default model "
                        f"is outside the data root {str(root)!r}: pass model_name, the path of a model folder "
                        "or .gguf file inside it (or call setup with no arguments for the last setup again).")
    resolve_user_path(model, root, must_exist=True, what="model_name")


def _check_generate(kwargs: dict) -> None:
    unknown = {k: v for k, v in kwargs.items() if k not in OPTIONS and k not in OWN_OPTIONS
               and k not in GENERATE_EXTRA}
    if unknown:
        parse_options(unknown)  # raises the engine's own message (with a suggestion)
        raise InvalidInput(f"Unknown generation option(s) {', '.join(map(repr, unknown))}.")
    for name in GENERATE_FLAGS:
        _check_flag(name, kwargs.get(name), "generate")
    system_prompt = kwargs.get("system_prompt")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise InvalidInput(f"system_prompt must be a string, got {system_prompt!r}.")


def _check_flag(name: str, value: Any, action: str) -> None:
    if value is not None and not isinstance(value, bool):
        raise InvalidInput(f"{name} of llm.{action} must be true or false, got {value!r}.")
