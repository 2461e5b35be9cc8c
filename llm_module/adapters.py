"""Attaching and detaching named LoRA adapters on one base model (peft).

The first adapter wraps the base model in a PeftModel; the last one removed unwraps
it, so a model with no adapters runs at plain speed.
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

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
META_FILE = "llm_module.json"  # written by llm.train beside the adapter


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
    if not isinstance(name, str) or not NAME_RE.match(name) or name == BASE:
        raise InvalidInput(
            f"Adapter name {name!r} is not valid: use 1-64 letters, digits, '_', '-' or '.', starting with a "
            "letter or digit."
        )
    return name


def find_adapter_dir(path: Path) -> Path:
    """The directory holding adapter_config.json: ``path`` itself or its ``final`` child."""
    recover_dir(path)
    if path.is_dir():
        recover_dir(path / "final")
    if not path.exists():
        raise NotFound(f"Adapter path {str(path)!r} does not exist; check the path.")
    if not path.is_dir():
        raise InvalidInput(f"Adapter path {str(path)!r} is not a directory; give the folder llm.train wrote.")
    for candidate in (path, path / "final"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise InvalidInput(
        f"{str(path)!r} is not a LoRA adapter: it has no adapter_config.json (nor a final/ folder with one). "
        "Give a folder written by llm.train or peft's save_pretrained."
    )


def read_info(name: str, adapter_dir: Path) -> AdapterInfo:
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{adapter_dir}/adapter_config.json is unreadable ({exc}); retrain or re-save it.") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidInput(f"{adapter_dir} holds a {config.get('peft_type')} adapter; only LoRA adapters load.")
    meta_path = adapter_dir / META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    size = sum(f.stat().st_size for f in adapter_dir.iterdir() if f.is_file())
    return AdapterInfo(
        name=name,
        path=str(adapter_dir),
        base_model=meta.get("base_model") or config.get("base_model_name_or_path"),
        size_bytes=size,
        trained_at=meta.get("trained_at"),
        meta=meta,
    )


def attach(model, adapter_dir: Path, name: str):
    """Load the adapter into ``model`` under ``name``; return the (possibly new) top model."""
    from peft import PeftModel

    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(adapter_dir), adapter_name=name)
            return model
        wrapped = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name)
        wrapped.eval()
        return wrapped
    except (RuntimeError, ValueError, KeyError, AttributeError) as exc:
        if isinstance(model, PeftModel) and name in model.peft_config:
            detach(model, name)
        hint = str(exc).splitlines()[0][:300]
        raise InvalidInput(
            f"Adapter {str(adapter_dir)!r} does not fit the loaded base model ({hint}). It was probably "
            "trained for another base model: load that model with llm.setup, or retrain on this one."
        ) from exc


def detach(model, name: str):
    """Remove adapter ``name`` and free its weights; unwrap when none is left."""
    from peft import PeftModel

    if not isinstance(model, PeftModel) or name not in model.peft_config:
        raise NotFound(f"Adapter {name!r} is not loaded.")
    if len(model.peft_config) == 1:
        return model.unload()  # strips the LoRA layers, back to the plain base model
    if model.active_adapter == name:
        model.set_adapter(next(n for n in model.peft_config if n != name))
    model.delete_adapter(name)
    return model
