"""``llm.export``: a trained adapter out of llm_module, for transformers, llama.cpp and Ollama.

Formats:

* ``hf``: the base model with the adapter merged in (peft's ``merge_and_unload`` on a private
  float copy of the base), saved as safetensors with its tokenizer and chat template: plain
  ``AutoModelForCausalLM.from_pretrained(output_dir)`` loads it;
* ``gguf`` (alias ``ollama``): that merged model as GGUF files, one per type in ``quantization``
  (``f16`` by default; ``f32``, ``bf16``, ``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``),
  written with the ``gguf`` package as llama.cpp's convert_hf_to_gguf.py writes a Llama model,
  plus an Ollama ``Modelfile`` with the chat template and stop tokens;
* ``lora-gguf``: the adapter alone in llama.cpp's LoRA GGUF format (``llama-server --model base.gguf
  --lora adapter.gguf``; Ollama: ``ADAPTER``), as convert_lora_to_gguf.py writes it.

The work runs on a private float copy of the base (never the served copy); each output folder
is written beside its final place and renamed into it, with ``llm_module_export.json`` describing
what is in it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import Conflict, InvalidInput, suggest
from ..paths import atomic_dir

log = logging.getLogger(__name__)

FORMATS = ("hf", "gguf", "lora-gguf")
ALIASES = {"ollama": "gguf", "llama.cpp": "gguf", "transformers": "hf", "safetensors": "hf", "lora": "lora-gguf"}
MODEL_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
LORA_TYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_TYPES = {"gguf": ["f16"], "lora-gguf": ["f32"]}
EXPORT_OPTIONS = ("quantization", "name", "overwrite", "system_prompt")
MANIFEST = "llm_module_export.json"


def check_format(fmt: Any) -> str:
    if not isinstance(fmt, str):
        raise InvalidInput(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}.")
    fmt = ALIASES.get(fmt.lower(), fmt.lower())
    if fmt not in FORMATS:
        raise InvalidInput(f"format {fmt!r} is not known.{suggest(fmt, FORMATS)} Use one of {', '.join(FORMATS)}.")
    return fmt


def check_options(fmt: str, options: dict) -> dict:
    """The export options, checked: {"quantization": [types], "name": str, "overwrite": bool, ...}."""
    for key in options:
        if key not in EXPORT_OPTIONS:
            raise InvalidInput(f"llm.export got an unknown option {key!r}.{suggest(key, EXPORT_OPTIONS)} "
                               f"It takes: adapter, output_dir, format, {', '.join(EXPORT_OPTIONS)}.")
    checked = dict(options)
    quantization = options.get("quantization")
    if fmt == "hf":
        if quantization not in (None, [], "f32", ["f32"]):
            raise InvalidInput("format='hf' writes float32 safetensors; quantization applies to 'gguf' and "
                               "'lora-gguf'.")
        checked["quantization"] = []
    else:
        allowed = MODEL_TYPES if fmt == "gguf" else LORA_TYPES
        types = DEFAULT_TYPES[fmt] if quantization in (None, []) else \
            [quantization] if isinstance(quantization, str) else quantization
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise InvalidInput(f"quantization must be a type or a list of types ({', '.join(allowed)}), "
                               f"got {quantization!r}.")
        types = [t.lower() for t in types]
        for t in types:
            if t not in allowed:
                raise InvalidInput(f"quantization {t!r} is not available for format={fmt!r}.{suggest(t, allowed)} "
                                   f"Use {', '.join(allowed)}.")
        checked["quantization"] = list(dict.fromkeys(types))
    name = options.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip() or "/" in name or name.startswith(".")):
        raise InvalidInput(f"name must be a file name stem such as 'catalog-model', got {name!r}.")
    for key in ("overwrite",):
        if key in options and not isinstance(options[key], bool):
            raise InvalidInput(f"{key} must be true or false, got {options[key]!r}.")
    if options.get("system_prompt") is not None and not isinstance(options["system_prompt"], str):
        raise InvalidInput("system_prompt must be a string (the Modelfile's SYSTEM line).")
    return checked


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse a folder that holds anything but a previous export (unless ``overwrite``)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise InvalidInput(f"output_dir {str(output_dir)!r} is a file; give a folder (it is created if missing).")
    if not output_dir.is_dir() or not any(output_dir.iterdir()) or overwrite:
        return
    if not (output_dir / MANIFEST).is_file():
        names = sorted(p.name for p in output_dir.iterdir())[:5]
        raise Conflict(f"output_dir {str(output_dir)!r} already holds other files ({', '.join(names)}); give an empty "
                       "or new folder, or pass overwrite=true to replace it.")


def export_adapter(setup_args: dict, adapter_dir: Path, output_dir: Path, fmt: str, *, models_dir: Path,
                   adapter_name: str, **options: Any) -> dict:
    """Export the adapter in ``adapter_dir`` (trained on the base model ``setup_args`` load) as ``fmt``."""
    from ..adapter_files import read_config
    from ..runtime.memory import release_memory
    from .merge import load_base

    fmt = check_format(fmt)
    options = check_options(fmt, options)
    check_output_dir(output_dir, options.get("overwrite", False))
    config = read_config(adapter_dir)
    start = time.perf_counter()
    stem = options.get("name") or adapter_name
    base = load_base(setup_args, models_dir)
    try:
        return _export(base, adapter_dir, config, output_dir, fmt, options, adapter_name, stem, start)
    finally:
        del base
        release_memory()  # the float copy: give it back to the OS, as after training


def _export(base, adapter_dir: Path, config: dict, output_dir: Path, fmt: str, options: dict, adapter_name: str,
            stem: str, start: float) -> dict:
    from .merge import merged_model, save_hf
    from .modelfile import write_modelfile
    from .writer import hf_dir_to_gguf, lora_to_gguf

    files: list[dict] = []
    notes: list[str] = []
    with atomic_dir(output_dir) as tmp:
        if fmt == "lora-gguf":
            for qtype in options["quantization"]:
                path = tmp / f"{stem}-lora-{qtype}.gguf"
                notes += lora_to_gguf(adapter_dir, config, base.model.config, path, qtype, name=stem)
                files.append(_describe(path, output_dir, qtype))
            write_modelfile(tmp / "Modelfile", base.tokenizer, model_file=_base_gguf(base),
                            adapter_file=files[0]["file"], system_prompt=options.get("system_prompt"))
        elif fmt == "hf":
            save_hf(merged_model(base.model, adapter_dir, config), base.tokenizer, tmp)
        else:
            scratch = Path(tempfile.mkdtemp(prefix=".merged-", dir=output_dir.parent))
            try:
                save_hf(merged_model(base.model, adapter_dir, config), base.tokenizer, scratch)
                for qtype in options["quantization"]:
                    path = tmp / f"{stem}-{qtype}.gguf"
                    notes += hf_dir_to_gguf(scratch, path, qtype, name=stem)
                    files.append(_describe(path, output_dir, qtype))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            write_modelfile(tmp / "Modelfile", base.tokenizer, model_file=files[0]["file"],
                            system_prompt=options.get("system_prompt"))
        described = {f["file"] for f in files}
        files += [_describe(p, output_dir, None) for p in sorted(tmp.iterdir())
                  if p.is_file() and p.name not in described]
        manifest = {
            "format": fmt, "adapter": adapter_name, "adapter_dir": str(adapter_dir),
            "base_model": base.name, "base_model_id": _base_id(adapter_dir, config),
            "lora": {"r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
                     "use_rslora": bool(config.get("use_rslora")), "use_dora": bool(config.get("use_dora")),
                     "target_modules": config.get("target_modules")},
            "files": [f["file"] for f in files], "created_at": time.time(), "notes": notes,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    seconds = round(time.perf_counter() - start, 2)
    return {"format": fmt, "adapter": adapter_name, "output_dir": str(output_dir), "files": files,
            "base_model_id": manifest["base_model_id"], "notes": notes, "seconds": seconds}


def _describe(path: Path, output_dir: Path, qtype: str | None) -> dict:
    return {"file": path.name, "path": str(output_dir / path.name), "bytes": path.stat().st_size,
            **({"type": qtype} if qtype else {})}


def _base_id(adapter_dir: Path, config: dict) -> str | None:
    meta_path = adapter_dir / "llm_module.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    except (OSError, ValueError):
        meta = {}
    return meta.get("base_model_id") or config.get("base_model_name_or_path")


def _base_gguf(base) -> str | None:
    """The GGUF file the base model was converted from, when it was (llama.cpp loads it as is)."""
    from ..training.provenance import base_provenance

    source = base_provenance(base.model, base.name)["source"]
    return source.get("path") if source.get("kind") == "gguf" else None
