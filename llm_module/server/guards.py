"""Checks the service adds in front of the engine: file paths confined to the data root,
generation caps the engine's Limits do not cover, and model options that would reach
outside the sandbox (remote code, cache folders).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_module.errors import Forbidden, InvalidInput, PayloadTooLarge
from llm_module.generation import PIPELINE_DEFAULTS
from llm_module.paths import resolve_user_path
from llm_module.server.settings import Settings

# Parameters that name files, per action (kwargs and training_params are scanned by key name too).
PATH_PARAMS = {
    "setup": ("lora_dir",),
    "train": ("data_file", "output_dir", "resume_from_checkpoint"),
    "evaluate": ("data_file",),
    "load_adapter": ("path",),
}
MODEL_PARAMS = ("model_name", "tokenizer_name")  # a path, or a hub id
PATH_KEY_SUFFIXES = ("_dir", "_path", "_file", "_folder")
# from_pretrained options that run remote code or read/write outside the data root.
REFUSED_ALWAYS = {"trust_remote_code", "code_revision"}
REFUSED_WITH_ROOT = {"cache_dir", "offload_folder", "gguf_file", "subfolder", "local_dir"}


def check_action(action: str, kwargs: dict, settings: Settings) -> dict:
    """Return ``kwargs`` with paths resolved inside the data root; raise on anything refused."""
    kwargs = dict(kwargs)
    root = settings.data_root
    if action == "generate":
        return check_generation(kwargs, settings)
    if action == "setup":
        _check_model_kwargs(kwargs, root)
        for name in MODEL_PARAMS:
            if kwargs.get(name) is not None:
                kwargs[name] = confine_model_name(kwargs[name], root, name)
        if isinstance(kwargs.get("adapters"), dict) and root is not None:
            kwargs["adapters"] = {n: _confine(p, root, f"adapter {n!r}") for n, p in kwargs["adapters"].items()}
    for name in PATH_PARAMS.get(action, ()):
        if isinstance(kwargs.get(name), str) and root is not None:
            kwargs[name] = _confine(kwargs[name], root, name)
    if action in ("train", "evaluate") and root is not None:
        kwargs = _confine_path_like_keys(kwargs, root)
        if isinstance(kwargs.get("training_params"), dict):
            kwargs["training_params"] = _confine_path_like_keys(kwargs["training_params"], root)
    return kwargs


def _confine(path: Any, root: Path, what: str) -> Any:
    if not isinstance(path, str):
        return path  # the engine names the type error
    return str(resolve_user_path(path, root, must_exist=False, what=what))


def _confine_path_like_keys(values: dict, root: Path) -> dict:
    return {
        key: _confine(value, root, key) if key.endswith(PATH_KEY_SUFFIXES) and isinstance(value, str) else value
        for key, value in values.items()
    }


def confine_model_name(value: Any, root: Path | None, what: str) -> Any:
    """A model path must lie in the data root; a bare hub id (``org/name``) passes as it is."""
    if root is None or not isinstance(value, str):
        return value
    looks_like_path = value.startswith(("/", ".", "~")) or value.endswith(".gguf") or value.count("/") > 1
    if looks_like_path or (root / value).exists():
        return str(resolve_user_path(value, root, must_exist=False, what=what))
    if Path(value).exists():  # relative to the server's working directory: outside the root
        raise Forbidden(f"{what} {value!r} is not inside the data root {str(root)!r}; give a path inside it.")
    return value


def _check_model_kwargs(kwargs: dict, root: Path | None) -> None:
    for group in ("model_kwargs", "tokenizer_kwargs"):
        options = kwargs.get(group)
        if not isinstance(options, dict):
            continue
        for key in options:
            if key in REFUSED_ALWAYS:
                raise Forbidden(f"{group}[{key!r}] is refused by this server: it would run code from the model "
                                "folder. Convert the model to a plain transformers architecture instead.")
            if root is not None and key in REFUSED_WITH_ROOT:
                raise Forbidden(f"{group}[{key!r}] is refused by this server: it reads or writes files outside "
                                "the data root. Put the model inside the data root and pass its path.")


def check_generation(kwargs: dict, settings: Settings) -> dict:
    """Caps on top of the engine's Limits: max_length, beams, chat text; default max_new_tokens fits the cap."""
    kwargs = dict(kwargs)
    cap = settings.max_new_tokens
    max_length = kwargs.get("max_length")
    if isinstance(max_length, int) and not isinstance(max_length, bool) and max_length > cap:
        raise InvalidInput(f"max_length={max_length} is over this server's cap of {cap} new tokens; "
                           f"pass max_new_tokens (at most {cap}) instead.")
    if kwargs.get("max_new_tokens") is None and max_length is None and PIPELINE_DEFAULTS["max_new_tokens"] > cap:
        kwargs["max_new_tokens"] = cap
    beams = kwargs.get("num_beams")
    if isinstance(beams, int) and beams > settings.max_return_sequences:
        raise InvalidInput(f"num_beams={beams} is over this server's cap of {settings.max_return_sequences}.")
    _check_chat_text(kwargs, settings.max_prompt_chars)
    return kwargs


def _check_chat_text(kwargs: dict, cap: int) -> None:
    messages = kwargs.get("messages")
    total = len(kwargs["system_prompt"]) if isinstance(kwargs.get("system_prompt"), str) else 0
    if isinstance(messages, list):
        total += sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))
    if total > cap:
        raise PayloadTooLarge(f"The messages and system prompt hold {total} characters, over this server's cap of "
                              f"{cap}; shorten them.")
