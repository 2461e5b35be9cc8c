"""Every change llm_module makes to a served model, applied here and nowhere else.

``prepare(model, settings, device=..., source=...)`` turns a freshly loaded model into the served
copy and returns a ``Patches`` record of what it changed, which ``/v1/model`` and ``llm.model_info``
show:

* linear layers packed to int4/int8 (quantize.py), with the kernel that runs them (int4_kernel.py);
* grouped-query attention without copying keys and values (attention.py);
* float32 RMSNorms as one fused op (norms.py);
* torch's thread count.

Training loads its own float copy and never sees these. The per-row LoRA forwards of the serving
core are the other model change; they exist only inside the serving loop (runtime/lora_rows.py,
``LoraRows.installed``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from . import int4_kernel
from .attention import use_decode_attention, use_grouped_attention
from .norms import use_fused_rms_norm
from .quantize import DEFAULT_QUANT_MODE, QUANT_MODES, packed_cache_file, quantize_linears, runs_on_own_kernels
from .threads import set_thread_count

log = logging.getLogger(__name__)


@dataclass
class Patches:
    """What ``prepare`` changed in a model."""

    quantize: str = "none"  # none, int8 or int4
    quantized_linears: int = 0
    int4_kernel: str = "none"  # which kernel runs int4 layers: llm_module's own, torch's, or none
    dense_prefill: bool = False
    grouped_attention: bool = False
    decode_attention: int = 0  # attention layers whose decoding steps run on llm_module's kernel
    fused_rms_norms: int = 0
    threads: int = 0
    quantization_cost: dict | None = None  # held-out perplexity before and after packing

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_quant_mode(requested: str | None, device: str, dtype: torch.dtype, *, from_gguf: bool = True) -> str:
    """'auto' packs on a CPU in fp32 and nothing elsewhere (CUDA has other kernels).

    int4 reproduces a 4-bit GGUF's own grid, so it is only the default for models converted
    from one; a full-precision model would lose quality at 4 bits, so other models stay as they
    are unless asked (bench/findings.md has the measured cost of each mode).
    """
    mode = (requested or "auto").lower()
    if mode == "auto":
        if device != "cpu" or dtype != torch.float32:
            return "none"
        return DEFAULT_QUANT_MODE if from_gguf else "none"
    if mode not in QUANT_MODES:
        raise ValueError(f"quantize must be one of auto, {', '.join(QUANT_MODES)}; got {mode!r}")
    return mode


def is_gguf_conversion(source: str | None) -> bool:
    """True for a model directory that loader.convert_gguf wrote from a 4-bit GGUF file."""
    if not source:
        return False
    marker = Path(source) / "llm_module_source.json"
    try:
        gguf = json.loads(marker.read_text(encoding="utf-8")).get("gguf", "")
    except (OSError, ValueError):
        return False
    return bool(re.search(r"\bQ4_", Path(gguf).name, re.IGNORECASE))


HELD_OUT = Path(__file__).with_name("heldout.txt")  # plain English prose, written for llm_module
HELD_OUT_TOKENS = 256


@torch.inference_mode()
def held_out_perplexity(model: nn.Module, tokenizer, tokens: int = HELD_OUT_TOKENS) -> float:
    """Perplexity of the first ``tokens`` tokens of a held-out text: measured before and after packing, it
    is what quantization costs this model (setup's result reports it)."""
    text = HELD_OUT.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :tokens]
    ids = ids.to(next(model.parameters()).device)
    logits = model(input_ids=ids).logits[0, :-1].float()
    return float(torch.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:])))


def _read_json(path: Path | None) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path is not None else None
    except (OSError, ValueError):
        return None


def _write_json(path: Path | None, value: dict) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value), encoding="utf-8")
    except OSError as exc:  # a read-only cache only costs the measurement next start
        log.warning("Could not save %s: %s", path, exc)


def prepare(model: nn.Module, settings, *, device: str, source: str | None = None, quantize: str | None = None,
            tokenizer=None) -> Patches:
    """Make a loaded base model fast to serve (call it on the serving copy only: training needs the
    float weights). ``source``, the local model directory, lets later starts read packed weights
    instead of packing again (and the measured cost of packing); ``quantize`` overrides
    ``settings.quantize`` for this model; with ``tokenizer`` the cost of packing is measured."""
    dtype = next(model.parameters()).dtype
    mode = resolve_quant_mode(quantize or settings.quantize, device, dtype, from_gguf=is_gguf_conversion(source))
    own_kernel = settings.int4_kernel
    dense = mode == "int4" and settings.dense_prefill
    cache = packed_cache_file(source, mode, settings.models_dir, dense, own_kernel)
    cost_file = cache.with_suffix(".cost.json") if cache is not None else None
    cost = _read_json(cost_file)
    measure = mode != "none" and cost is None and tokenizer is not None
    reference = held_out_perplexity(model, tokenizer) if measure else None
    count = quantize_linears(model, mode, cache_file=cache, dense_prefill=dense, own_kernel=own_kernel)
    if reference is not None and count:
        quantized = held_out_perplexity(model, tokenizer)
        cost = {"perplexity_float": round(reference, 4), "perplexity_quantized": round(quantized, 4),
                "ratio": round(quantized / reference, 5), "text": HELD_OUT.name, "tokens": HELD_OUT_TOKENS}
        _write_json(cost_file, cost)
    patches = Patches(
        quantize=mode if count else "none", quantized_linears=count,
        int4_kernel=int4_kernel.describe(own_kernel) if mode == "int4" and count else "none",
        dense_prefill=bool(dense and count),
        grouped_attention=device == "cpu" and use_grouped_attention(model),
        decode_attention=use_decode_attention(model) if device == "cpu" and runs_on_own_kernels(model) else 0,
        fused_rms_norms=use_fused_rms_norm(model) if device == "cpu" else 0,
        threads=set_thread_count(settings.torch_threads or None),
        quantization_cost=cost if count else None,
    )
    log.info("Prepared for serving: %s", patches.to_dict())
    return patches
