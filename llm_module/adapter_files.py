"""Adapter folders on disk: what counts as one, its name, its files, and how it changed.

The one owner of "is this an adapter folder" (a folder holding ``adapter_config.json``, or a
``llm.train`` output whose ``final/`` holds one), of adapter names, and of reading an adapter's
files into memory: safetensors only, so loading an adapter never runs pickled code.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidInput, NotFound
from .paths import recover_dir

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
META_FILE = "llm_module.json"  # written by llm.train beside the adapter
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"


@dataclass
class AdapterInfo:
    name: str
    path: str
    base_model: str | None
    size_bytes: int
    loaded_at: float = field(default_factory=time.time)
    trained_at: float | None = None
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidInput(
            f"Adapter name {name!r} is not valid: use 1-64 letters, digits, '_', '-' or '.', starting with a "
            "letter or digit."
        )
    return name


def name_for(path: Path) -> str:
    """An adapter's default name: its folder, or the run folder for a llm.train ``final/``."""
    path = Path(path)
    return path.parent.name if path.name == "final" else path.name


def adapter_dir_in(path: Path) -> Path | None:
    """The folder holding the adapter's config: ``path`` itself or its ``final`` child, else None."""
    for candidate in (path, path / "final"):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    return None


def find_adapter_dir(path: Path) -> Path:
    """``adapter_dir_in(path)``, finishing an interrupted swap first; a clear error when there is none."""
    recover_dir(path)
    if path.is_dir():
        recover_dir(path / "final")
    if not path.exists():
        raise NotFound(f"Adapter path {str(path)!r} does not exist; check the path.")
    if not path.is_dir():
        raise InvalidInput(f"Adapter path {str(path)!r} is not a directory; give the folder llm.train wrote.")
    found = adapter_dir_in(path)
    if found is None:
        raise InvalidInput(
            f"{str(path)!r} is not a LoRA adapter: it has no {CONFIG_FILE} (nor a final/ folder with one). "
            "Give a folder written by llm.train or peft's save_pretrained."
        )
    return found


def adapter_folders(root: Path) -> dict[str, Path]:
    """{name: adapter directory} for each adapter folder directly inside ``root`` (hidden ones skipped)."""
    found = {}
    for child in sorted(root.iterdir()) if root.is_dir() else ():
        if child.name.startswith(".") or not child.is_dir() or not NAME_RE.match(child.name):
            continue
        adapter_dir = adapter_dir_in(child)
        if adapter_dir is not None:
            found[child.name] = adapter_dir
    return found


def fingerprint(adapter_dir: Path) -> tuple | None:
    """What changes when an adapter is rewritten: its weight file's inode, size and mtime."""
    for name in (WEIGHTS_FILE, PICKLE_WEIGHTS_FILE):
        try:
            stat = (adapter_dir / name).stat()
        except OSError:
            continue
        return stat.st_ino, stat.st_size, stat.st_mtime_ns
    return None


def read_info(name: str, adapter_dir: Path) -> AdapterInfo:
    config = read_config(adapter_dir)
    meta_path = adapter_dir / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    except (OSError, ValueError):
        meta = {}
    size = sum(f.stat().st_size for f in adapter_dir.iterdir() if f.is_file())
    return AdapterInfo(
        name=name,
        path=str(adapter_dir),
        base_model=meta.get("base_model") or config.get("base_model_name_or_path"),
        size_bytes=size,
        trained_at=meta.get("trained_at"),
        meta=meta,
    )


def read_config(adapter_dir: Path) -> dict:
    try:
        config = json.loads((adapter_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{adapter_dir}/{CONFIG_FILE} is unreadable ({exc}); retrain or re-save it.") from exc
    if not isinstance(config, dict):
        raise InvalidInput(f"{adapter_dir}/{CONFIG_FILE} is not a JSON object; retrain or re-save it.")
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidInput(f"{adapter_dir} holds a {config.get('peft_type')} adapter; only LoRA adapters load.")
    return config


# LoRA initialisations that rewrite the base model's weights (peft subtracts the adapter's starting
# product from them): the adapter then fits only that rewritten copy, never the shared served base.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


def unservable_reason(config: dict, *, packed_base: bool) -> str | None:
    """Why an adapter with this LoRA config cannot be served on the base model, or None.

    ``packed_base``: the served base keeps its weights packed in int4/int8 (runtime/quantize.py).
    llm.train asks before it trains and load_adapter before it touches the model.
    """
    if config.get("use_dora") and packed_base:
        return ("DoRA (use_dora) needs the base model's full-precision weights (it rescales every output by the "
                "norm of the whole merged weight), and this base model is served with packed int4/int8 weights: "
                "load it unpacked with llm.setup(..., quantize='none') to use DoRA.")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        return (f"init_lora_weights={init!r} rewrites the base model's weights when the adapter is made, so the "
                "adapter fits only that rewritten copy, not the served base model.")
    return None


def read_weights(adapter_dir: Path, *, allow_pickle: bool = False) -> dict:
    """The adapter's tensors, read in full before any of them touches the model.

    Only safetensors: a ``.bin`` file is a pickle, and unpickling runs whatever code it holds, so
    it is refused unless ``allow_pickle`` (then read with ``weights_only``, which refuses code too).
    """
    path = adapter_dir / WEIGHTS_FILE
    if path.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # a torn or foreign file
            raise InvalidInput(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); "
                               "retrain the adapter or copy it again.") from exc
    pickled = adapter_dir / PICKLE_WEIGHTS_FILE
    if pickled.is_file():
        if not allow_pickle:
            raise InvalidInput(f"{pickled} is a pickle file, which can run code when loaded, so it is refused. "
                               "Re-save the adapter as safetensors (peft's save_pretrained does by default), or "
                               "set allow_pickle_adapters for folders you trust.")
        import torch

        try:
            return torch.load(str(pickled), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InvalidInput(f"{pickled} could not be read safely ({exc}).") from exc
    raise InvalidInput(f"{adapter_dir} has {CONFIG_FILE} but no {WEIGHTS_FILE}; the adapter is incomplete.")
