"""Serving-speed helpers: weight-only quantized linears, thread settings, inference preparation.

Why weight-only quantization: on a CPU, decoding one token reads every weight once, so a small
model is bound by memory traffic and per-op overhead, not arithmetic. The default model ships as
a GGUF whose linear weights are 4-bit with one scale and minimum per 32 values (Q4_1): packing
them back to 4 bits with the same grouping loses (almost) nothing and reads 8x fewer bytes than
fp32. For int4 on AVX-512 VNNI CPUs our own kernel (int4_kernel) reads each weight block once for
up to 8 rows and quantizes the fp32 input rows to int8 itself, as llama.cpp does; torch's packed
kernels (int8, and int4 elsewhere) want bf16 activations, so those layers cast their input to bf16
for the matmul only. The residual stream, norms and attention stay in the model's dtype.

Every choice here was kept because bench/ measured it faster on the reference CPU; see
bench/README.md for the figures and for what was tried and dropped.
"""

from __future__ import annotations

import json
import logging
import os
import re
import types
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from . import int4_kernel
from .attention import use_grouped_attention

log = logging.getLogger(__name__)

QUANT_MODES = ("none", "int8", "int4")
SPEED_ENV = "LLM_MODULE_QUANTIZE"  # overrides the default mode: none, int8 or int4
# 1 adds a bf16 copy of the int4 weights for prompts: 2-3x faster prefill, ~210 MB more, and bf16
# rounding (+0.6 % perplexity) that flips near-tie tokens, so it is opt-in (bench/findings.md).
DENSE_PREFILL_ENV = "LLM_MODULE_DENSE_PREFILL"
DEFAULT_QUANT_MODE = "int4"
INT4_GROUP_SIZE = 32  # the GGUF Q4_1 block size: the default model's weights fit this grid exactly
COMPUTE_DTYPE = torch.bfloat16  # what the packed-weight CPU kernels are fast with
# From this many rows a matmul is bound by arithmetic, not by reading the weight, and a dense bf16
# copy runs 2-3x faster than the int4 kernel (prefill); below it the packed weight wins (decoding).
DENSE_MIN_ROWS = 16
# Our int4 kernel quantizes each input row to int8 per group of 32 (as llama.cpp does). Two kinds
# of layer lost too much that way, so their inputs are quantized in two parts (the second holds the
# first's rounding error: ~1e-5 of the group's largest value): the MLP's output projection, whose
# input (the gated activation) has heavy tails (held-out perplexity +1.3 % vs fp32 with it in one
# part), and q/k/v, without which the demo's near-tie question ("What is the capital of France?")
# lost its first token and answered in French. bench/findings.md has the figures.
FINE_INPUT_PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "down_proj"})


class WeightOnlyLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is stored packed (int8 per row, or int4 per group).

    It subclasses ``nn.Linear`` so peft still wraps it with LoRA layers: LoRA adds its own
    low-rank product on top of ``base_layer(x)``, which is all this module changes.
    """

    def __init__(self, linear: nn.Linear, mode: str, group_size: int = INT4_GROUP_SIZE,
                 packed: tuple[torch.Tensor, ...] | None = None,
                 dense: bool | torch.Tensor = False, fine_input: bool = False) -> None:
        """Pack ``linear``'s weight, or take ``packed`` (``packed_tensors`` of an earlier packing).

        int4 weights take llm_module's own kernel's layout where it runs (int4_kernel), else torch's.

        ``dense`` also keeps a bf16 copy of the weight for inputs of ``DENSE_MIN_ROWS`` rows or more:
        True makes it from ``linear``'s weight, a tensor is that copy saved from an earlier packing.

        ``fine_input``: our kernel quantizes the input in two int8 parts instead of one (see
        ``FINE_INPUT_PROJECTIONS``).
        """
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.mode, self.group_size = mode, group_size
        if mode not in ("int8", "int4"):
            raise ValueError(f"unknown quantization mode {mode!r}; use one of {QUANT_MODES[1:]}")
        own_kernel = (mode == "int4" and int4_kernel.fits(self.out_features, self.in_features, group_size)
                      and int4_kernel.kernel() is not None)
        if packed is None or (len(packed) == 3) != own_kernel:  # none saved, or saved for the other kernel
            weight = linear.weight.detach().float()
            packed = (_quantize_int8(weight) if mode == "int8" else
                      int4_kernel.pack(*_int4_grid(weight, group_size)) if own_kernel else
                      _quantize_int4(weight, group_size))
        packed, scales, *mins = packed
        # A non-float "weight" tells peft not to cast LoRA weights to it; they stay in fp32.
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins[0] if mins else None)  # set: the weight is in our kernel's layout
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        if isinstance(dense, torch.Tensor):
            dense_weight = dense
        else:
            dense_weight = linear.weight.detach().to(COMPUTE_DTYPE) if dense else None
        self.register_buffer("dense_weight", dense_weight, persistent=False)
        self.input_cast: SharedInputCast | None = None  # set when siblings share this layer's input
        self.input_parts = 2 if fine_input else 1  # int8 parts our kernel quantizes the input in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A decode step calls this ~210 times on one row, where a kernel call takes 6-25 us: so the
        # tensors come straight from the module's dicts (nn.Module.__getattr__ costs ~1 us each)
        # and sibling projections of one input share its bf16 copy (SharedInputCast).
        params, buffers = self._parameters, self._buffers
        dense = buffers["dense_weight"]
        if dense is not None and x.numel() >= DENSE_MIN_ROWS * self.in_features:
            out = torch.nn.functional.linear(self._bf16_rows(x), dense)
        elif buffers["mins"] is not None:  # our kernel: it quantizes the fp32 rows itself
            flat = x.reshape(-1, self.in_features)
            out = int4_kernel.matmul(flat, params["weight"], buffers["scales"], buffers["mins"], self.input_parts)
        elif self.mode == "int8":
            out = torch._weight_int8pack_mm(self._bf16_rows(x), params["weight"], buffers["scales"])
        else:
            out = torch._weight_int4pack_mm_for_cpu(self._bf16_rows(x), params["weight"], self.group_size,
                                                    buffers["scales"])
        out = out.to(x.dtype).view(*x.shape[:-1], self.out_features)
        bias = params.get("bias")  # absent when the layer has none
        return out if bias is None else out + bias

    def _bf16_rows(self, x: torch.Tensor) -> torch.Tensor:
        """What torch's packed kernels and the dense copy read; shared with sibling projections."""
        return self.input_cast.cast(x) if self.input_cast is not None else _as_compute_rows(x)

    @property
    def packed_tensors(self) -> tuple[torch.Tensor, ...]:
        """What ``packed=`` takes to rebuild this layer without packing again."""
        extra = () if self.mins is None else (self.mins,)
        return (self.weight.data, self.scales, *extra)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


def _as_compute_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(COMPUTE_DTYPE)


class SharedInputCast:
    """The bf16 rows of the last input seen, for projections that read the same tensor in turn
    (q/k/v of one attention block, gate/up of one MLP): each input is cast once, not per layer.

    Matched by identity: the model code hands the very same tensor object to each sibling and
    never changes it in place between their calls. Dropped once all ``readers`` have had it, so
    no layer holds a (prompt-sized) input past its own forward.
    """

    def __init__(self, readers: int) -> None:
        self.readers = readers
        self.last: tuple | None = None  # (input, its bf16 rows, readers still to come), set at once

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        last = self.last  # one read: another thread's forward may replace it meanwhile
        if last is not None and last[0] is x:
            self.last = (x, last[1], last[2] - 1) if last[2] > 1 else None
            return last[1]
        rows = _as_compute_rows(x)
        self.last = (x, rows, self.readers - 1)
        return rows


# Projections that one block feeds with the same input, in transformers' Llama-family code.
SIBLING_PROJECTIONS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})


def _share_input_casts(model: nn.Module) -> None:
    for parent in model.modules():
        for names in SIBLING_PROJECTIONS:
            siblings = [getattr(parent, n, None) for n in names]
            if all(isinstance(m, WeightOnlyLinear) for m in siblings):
                shared = SharedInputCast(readers=len(siblings))
                for module in siblings:
                    module.input_cast = shared


def _quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: ``w ≈ q * scale``."""
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    packed = (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    return packed, scales.to(COMPUTE_DTYPE)


def _int4_grid(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of ``group_size`` inputs: (codes, scales, mins), ``w ≈ code * scale + min``.

    Min/max per group reproduces a Q4_1 block (``w = q * d + m``) whenever the block uses
    its lowest and highest codes, which nearly every 32-value block does.
    """
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-12)
    codes = ((groups - low[..., None]) / scales[..., None]).round().clamp(0, 15)
    return codes.reshape(rows, cols), scales, low


def _quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's int4 layout of ``_int4_grid``: ``w ≈ (q - 8) * scale + zero``, ``zero = min + 8 * scale``."""
    codes, scales, low = _int4_grid(weight, group_size)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    zeros = low + 8 * scales
    scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).contiguous()  # [groups, rows, 2]
    return packed, scales_and_zeros.to(COMPUTE_DTYPE)


def can_quantize(linear: nn.Module, mode: str, group_size: int = INT4_GROUP_SIZE) -> bool:
    if type(linear) is not nn.Linear or linear.weight.device.type != "cpu":
        return False
    return mode != "int4" or linear.in_features % group_size == 0


def quantize_linears(model: nn.Module, mode: str = DEFAULT_QUANT_MODE, *, skip: Iterable[str] = (),
                     cache_file: Path | None = None, dense_prefill: bool = False) -> int:
    """Replace every plain ``nn.Linear`` (not under a name in ``skip``) in place; return the count.

    The output head always gets int8 per row: in the default GGUF it is the 8-bit embedding
    table, and 4 bits there raised held-out perplexity 6.8 % (int8: +0.1 %). A tied embedding
    keeps its float copy for lookups; the head gets its own packed copy.
    ``cache_file`` keeps the packed tensors (and dense copies): packing takes seconds, reading them
    back does not, and the float weights are never read, so their file pages stay out of memory.
    """
    if mode == "none":
        return 0
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; use one of {QUANT_MODES}")
    skipped = tuple(skip)
    targets = [
        (name, module) for name, module in model.named_modules()
        if can_quantize(module, mode) and not any(name == s or name.startswith(s + ".") for s in skipped)
    ]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    saved = _read_packed(cache_file)
    fresh: dict[str, torch.Tensor] = {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer_mode = "int8" if module is head else mode
        packed = tuple(saved[f"{name}.{part}"] for part in PACKED_PARTS if f"{name}.{part}" in saved) if saved else None
        dense = dense_prefill and module is not head
        if dense and saved:
            dense = saved.get(f"{name}.dense", True)
        layer = WeightOnlyLinear(module, layer_mode, packed=packed, dense=dense,
                                 fine_input=child in FINE_INPUT_PROJECTIONS)
        setattr(parent, child, layer)
        parts = zip(PACKED_PARTS, layer.packed_tensors, strict=False)  # 2 or 3 by the layout
        fresh.update({f"{name}.{part}": tensor for part, tensor in parts})
        if layer.dense_weight is not None:
            fresh[f"{name}.dense"] = layer.dense_weight
    _share_input_casts(model)
    if cache_file is not None and not saved and fresh:
        _write_packed(cache_file, fresh)
    if targets and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # so nothing re-ties the packed head to the embedding
    return len(targets)


PACKED_PARTS = ("weight", "scales", "mins")  # WeightOnlyLinear.packed_tensors, as named in the cache file


def _read_packed(cache_file: Path | None) -> dict[str, torch.Tensor] | None:
    if cache_file is None or not cache_file.is_file():
        return None
    from safetensors.torch import load_file

    try:
        # Copies, not views of safetensors' file mapping: torch's int8 head kernel segfaulted on a
        # batch of 15 rows while its weight was such a view; the same batch runs with copies.
        return {name: tensor.clone() for name, tensor in load_file(str(cache_file)).items()}
    except Exception as exc:  # a torn or foreign file: pack again and overwrite it
        log.warning("Ignoring unreadable packed-weight cache %s: %s", cache_file, exc)
        return None


def _write_packed(cache_file: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, cache_file)
    except OSError as exc:  # a read-only cache only costs the packing time next start
        log.warning("Could not save packed weights to %s: %s", cache_file, exc)


def packed_cache_file(source: str | None, mode: str, dense: bool = False) -> Path | None:
    """Where packed weights of the local model directory ``source`` live; None for hub ids.

    The key covers the directory and its weight files' sizes and times, the mode, whether dense
    prefill copies are kept and the torch version (the packed layout is torch's own), so a
    changed model or torch packs afresh.
    """
    if not source or mode == "none" or not Path(source).is_dir():
        return None
    import hashlib

    from .paths import model_cache_dir

    root = Path(source).resolve()
    layout = int4_kernel.LAYOUT if mode == "int4" and int4_kernel.kernel() is not None else "torch"
    stamp = [str(root), mode, str(INT4_GROUP_SIZE), torch.__version__, layout] + (["dense"] if dense else [])
    for weights in sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")):
        stat = weights.stat()
        stamp.append(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}")
    key = hashlib.sha1("|".join(stamp).encode()).hexdigest()[:16]
    return model_cache_dir() / "packed" / f"{root.name}-{mode}{'-dense' if dense else ''}-{key}.safetensors"


def resolve_quant_mode(requested: str | None, device: str, dtype: torch.dtype, *, from_gguf: bool = True) -> str:
    """'auto' packs on a CPU in fp32 and nothing elsewhere (CUDA has other kernels).

    int4 reproduces a 4-bit GGUF's own grid, so it is only the default for models converted
    from one; a full-precision model would lose quality at 4 bits, and torch's int8 kernel
    crashed on small shapes here, so other models stay as they are unless asked.
    """
    mode = (requested if requested not in (None, "", "auto") else os.environ.get(SPEED_ENV) or "auto").lower()
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


# transformers' RMSNorm classes computing ``weight * x * rsqrt(mean(x^2) + eps)`` in seven ops.
PLAIN_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}


def use_fused_rms_norm(model: nn.Module) -> int:
    """Run a float32 model's RMSNorms as torch's single ``rms_norm`` op; return how many.

    The same arithmetic in one op instead of seven: bitwise the same output in float32 (tested),
    and 61 norms a decode step. Other dtypes keep transformers' code (it rounds in between).
    """
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (type(module).__name__ in PLAIN_RMS_NORMS and isinstance(weight, torch.Tensor)
                and weight.dtype == torch.float32 and hasattr(module, "variance_epsilon")):
            module.forward = types.MethodType(_fused_rms_norm_forward, module)  # a copy rebinds it
            count += 1
    return count


def _fused_rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != torch.float32:
        return type(self).forward(self, hidden_states)
    weight = self._parameters["weight"]
    return torch.rms_norm(hidden_states, weight.shape, weight, self.variance_epsilon)


def set_thread_count(threads: int | None = None) -> int:
    """Use one intra-op thread per core the process may run on (torch's default can exceed that)."""
    wanted = threads or len(os.sched_getaffinity(0))
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return wanted


def prepare_for_inference(model: nn.Module, device: str, quantize: str | None = "auto",
                          source: str | None = None) -> dict:
    """Make a loaded base model fast to serve; return what was done (for describe/bench).

    Call it on the serving copy only: training needs the float weights. ``source`` (the local
    model directory) lets later starts read the packed weights instead of packing again.
    """
    dtype = next(model.parameters()).dtype
    mode = resolve_quant_mode(quantize, device, dtype, from_gguf=is_gguf_conversion(source))
    dense = mode == "int4" and os.environ.get(DENSE_PREFILL_ENV, "0") == "1"
    count = quantize_linears(model, mode, cache_file=packed_cache_file(source, mode, dense), dense_prefill=dense)
    grouped = device == "cpu" and use_grouped_attention(model)
    fused_norms = use_fused_rms_norm(model) if device == "cpu" else 0
    threads = set_thread_count()
    log.info("Prepared for inference: %s linears quantized to %s (dense prefill %s), grouped attention %s, "
             "%s fused norms, %s threads", count, mode, dense, grouped, fused_norms, threads)
    return {"quantize": mode if count else "none", "quantized_linears": count, "dense_prefill": bool(dense and count),
            "grouped_attention": grouped, "fused_rms_norms": fused_norms, "threads": threads}


def parameter_count(model: nn.Module) -> int:
    """Parameters as the unpacked model has them (packed int4 weights hold two per byte)."""
    packed = {id(m.weight): m.in_features * m.out_features for m in model.modules() if isinstance(m, WeightOnlyLinear)}
    return sum(packed.get(id(p), p.numel()) for p in model.parameters())
