"""Weight-only quantized linears: the packed int4/int8 layers of the served copy.

Why weight-only quantization: on a CPU, decoding one token reads every weight once, so a small
model is bound by memory traffic and per-op overhead, not arithmetic. The default model ships as
a GGUF whose linear weights are 4-bit with one scale and minimum per 32 values (Q4_1): packing
them back to 4 bits with the same grouping loses (almost) nothing and reads 8x fewer bytes than
fp32. On AVX-512 VNNI CPUs our own kernels (int4_kernel) run the int4 layers and the int8 output
head: they read each weight block once for up to 8 rows, quantize the fp32 input rows to int8
themselves, as llama.cpp does, and return fp32. Elsewhere torch's packed kernels run them; they
want bf16 activations, so those layers cast their input to bf16 for the matmul only (and torch's
int8 kernel rounds its output, the logits, to bf16). The residual stream, norms and attention stay
in the model's dtype.

Every choice here was kept because bench/ measured it faster on the reference CPU; the figures
and what was tried and dropped are in bench/findings.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from . import int4_kernel

log = logging.getLogger(__name__)

QUANT_MODES = ("none", "int8", "int4")
DEFAULT_QUANT_MODE = "int4"
INT4_GROUP_SIZE = 32  # the GGUF Q4_1 block size: the default model's weights fit this grid exactly
COMPUTE_DTYPE = torch.bfloat16  # what the packed-weight CPU kernels are fast with
# From this many rows a matmul is bound by arithmetic, not by reading the weight, and a dense bf16
# copy beats the int4 kernel (prefill); below it the packed weight wins (decoding). Figures:
# bench/findings.md.
DENSE_MIN_ROWS = 16
# Our int4 kernel quantizes each input row to int8 per group of 32 (as llama.cpp does). Two kinds
# of layer lost too much that way, so their inputs are quantized in two parts (the second holds the
# first's rounding error): the MLP's output projection, whose input (the gated activation) has
# heavy tails, and q/k/v, without which the demo's near-tie question ("What is the capital of
# France?") lost its first token and answered in French. bench/findings.md has the figures.
FINE_INPUT_PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "down_proj"})
# Our int8 kernel reads the output head's input in two int8 parts: with one, enough greedy tokens
# differed from the exact head's to flip the demo's near-tie first token; with two, none did
# (bench/findings.md, "int8 output head").
HEAD_INPUT_PARTS = 2

# Which kernel a packed layer runs (WeightOnlyLinear.kernel).
OWN_INT4, OWN_INT8, TORCH_INT4, TORCH_INT8 = "llm_module int4", "llm_module int8", "torch int4", "torch int8"


class WeightOnlyLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is stored packed (int8 or int4, per group of 32 inputs
    with our kernels; int8 per row or int4 per group with torch's).

    It subclasses ``nn.Linear`` so peft still wraps it with LoRA layers: LoRA adds its own
    low-rank product on top of ``base_layer(x)``, which is all this module changes.
    """

    def __init__(self, linear: nn.Linear, mode: str, group_size: int = INT4_GROUP_SIZE,
                 packed: tuple[torch.Tensor, ...] | None = None,
                 dense: bool | torch.Tensor = False, fine_input: bool = False, own_kernel: bool = True) -> None:
        """Pack ``linear``'s weight, or take ``packed`` (``packed_tensors`` of an earlier packing;
        packed for the other kernel, it is packed again).

        Weights take llm_module's own kernel's layout where it runs and the shape fits
        (int4_kernel), else torch's: ``kernel`` says which.

        ``dense`` also keeps a bf16 copy of the weight for inputs of ``DENSE_MIN_ROWS`` rows or more:
        True makes it from ``linear``'s weight, a tensor is that copy saved from an earlier packing.

        ``fine_input``: our kernel quantizes the input in two int8 parts instead of one (see
        ``FINE_INPUT_PROJECTIONS``). ``own_kernel=False``: torch's kernel even where ours is built.
        """
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.mode, self.group_size = mode, group_size
        if mode not in ("int8", "int4"):
            raise ValueError(f"unknown quantization mode {mode!r}; use one of {QUANT_MODES[1:]}")
        own_kernel = own_kernel and _own_kernel_fits(mode, self.out_features, self.in_features, group_size)
        self.kernel = (OWN_INT8 if mode == "int8" else OWN_INT4) if own_kernel else (
            TORCH_INT8 if mode == "int8" else TORCH_INT4)
        if packed is None or _in_own_layout(packed) != own_kernel:  # none saved, or saved for the other kernel
            weight = linear.weight.detach().float()
            if mode == "int8":
                packed = int4_kernel.pack_int8(*_int8_grid(weight)) if own_kernel else _quantize_int8(weight)
            else:
                packed = int4_kernel.pack(*_int4_grid(weight, group_size)) if own_kernel else (
                    _quantize_int4(weight, group_size))
        packed, scales, *mins = packed
        # A non-float "weight" tells peft not to cast LoRA weights to it; they stay in fp32.
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins[0] if mins else None)  # set for int4 in our kernel's layout only
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
        elif self.kernel == OWN_INT4:  # our kernels: they quantize the fp32 rows themselves
            flat = x.reshape(-1, self.in_features)
            out = int4_kernel.matmul(flat, params["weight"], buffers["scales"], buffers["mins"], self.input_parts)
        elif self.kernel == OWN_INT8:
            flat = x.reshape(-1, self.in_features)
            out = int4_kernel.matmul_int8(flat, params["weight"], buffers["scales"], self.out_features,
                                          self.input_parts)
        elif self.kernel == TORCH_INT8:
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
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
                f"kernel={self.kernel}")


def _own_kernel_fits(mode: str, out_features: int, in_features: int, group_size: int) -> bool:
    """Whether llm_module's kernel runs a ``mode`` layer of this shape here."""
    if mode == "int8":
        fits = int4_kernel.fits_int8(out_features, in_features)
    else:
        fits = int4_kernel.fits(out_features, in_features, group_size)
    return fits and int4_kernel.kernel() is not None


def _in_own_layout(packed: tuple[torch.Tensor, ...]) -> bool:
    """Our kernels' packed weights are [blocks, groups, chunks, 64] bytes; torch's are 2-D."""
    return packed[0].dim() == 4


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
    """Symmetric int8 per output row, for torch's kernel: ``w ≈ q * scale``."""
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    packed = (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    return packed, scales.to(COMPUTE_DTYPE)


def _int8_grid(weight: torch.Tensor, group_size: int = int4_kernel.GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per group of ``group_size`` inputs, for our kernel: (codes, float16 scales),
    ``w ≈ code * scale``.

    A GGUF Q8_0 block (``w = q * d``, ``d`` float16, ``q = round(x / d)`` with ``d = amax / 127``)
    comes back exactly: its largest code is ±127, so ``amax / 127`` is ``d`` itself.
    """
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // group_size, group_size)
    scales = (groups.abs().amax(dim=-1) / 127).clamp(max=torch.finfo(torch.float16).max).to(torch.float16)
    step = scales.float()[..., None]
    codes = torch.where(step > 0, groups / step, torch.zeros_like(groups)).round().clamp(-128, 127)
    return codes.to(torch.int8).reshape(rows, cols), scales


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
                     cache_file: Path | None = None, dense_prefill: bool = False, own_kernel: bool = True) -> int:
    """Replace every plain ``nn.Linear`` (not under a name in ``skip``) in place; return the count.

    The output head always gets int8 (per group of 32 inputs with our kernel, per row with
    torch's): in the default GGUF it is the 8-bit embedding table (Q8_0, which our grid
    reproduces), and 4 bits there cost far more held-out perplexity than 8 (bench/findings.md). A tied
    embedding keeps its float copy for lookups; the head gets its own packed copy.
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
        fine_input = child in FINE_INPUT_PROJECTIONS or (module is head and HEAD_INPUT_PARTS == 2)
        layer = WeightOnlyLinear(module, layer_mode, packed=packed, dense=dense, fine_input=fine_input,
                                 own_kernel=own_kernel)
        setattr(parent, child, layer)
        # A tied head's packed copy repeats the embedding's parameters: parameter_count skips it.
        layer.copies_tied_embedding = module is head and bool(getattr(model.config, "tie_word_embeddings", False))
        if module is head:
            log.info("Output head %s (%dx%d): %s kernel, %s logits", name, layer.out_features, layer.in_features,
                     layer.kernel, "float32" if layer.kernel == OWN_INT8 else "bfloat16-rounded")
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


def packed_cache_file(source: str | None, mode: str, cache_root: Path, dense: bool = False,
                      own_kernel: bool = True) -> Path | None:
    """Where packed weights of the local model directory ``source`` live; None for hub ids.

    The key covers the directory and its weight files' sizes and times, the mode, whether dense
    prefill copies are kept and the torch version (the packed layout is torch's own), so a
    changed model or torch packs afresh.
    """
    if not source or mode == "none" or not Path(source).is_dir():
        return None
    import hashlib

    root = Path(source).resolve()
    ours = own_kernel and int4_kernel.kernel() is not None  # int4 layers and the int8 head alike
    layout = int4_kernel.LAYOUT if ours else "torch"
    stamp = [str(root), mode, str(INT4_GROUP_SIZE), torch.__version__, layout] + (["dense"] if dense else [])
    for weights in sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")):
        stat = weights.stat()
        stamp.append(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}")
    key = hashlib.sha1("|".join(stamp).encode()).hexdigest()[:16]
    return cache_root / "packed" / f"{root.name}-{mode}{'-dense' if dense else ''}-{key}.safetensors"




def has_packed_weights(model: nn.Module) -> bool:
    """True when some linear layer holds its weight packed (what peft's DoRA cannot read)."""
    return any(isinstance(module, WeightOnlyLinear) for module in model.modules())


def parameter_count(model: nn.Module) -> int:
    """Parameters as the unpacked model has them (packed int4 weights hold two per byte; a tied head's
    packed copy is the embedding's parameters again, counted once as the unpacked model does)."""
    packed = {id(m.weight): 0 if getattr(m, "copies_tied_embedding", False) else m.in_features * m.out_features
              for m in model.modules() if isinstance(m, WeightOnlyLinear)}
    return sum(packed.get(id(p), p.numel()) for p in model.parameters())


def runs_on_own_kernels(model: nn.Module, smallest: int = 1 << 18) -> bool:
    """Whether every linear layer of ``smallest`` weights or more runs on llm_module's kernels
    (packed, without a dense copy): then a forward pass needs no OpenMP threads of torch's
    (runtime/threads.py ``kernels_own_the_cores``); LoRA's small products run serially."""
    large = [m for m in model.modules() if isinstance(m, nn.Linear) and m.in_features * m.out_features >= smallest]
    return bool(large) and all(isinstance(m, WeightOnlyLinear) and m.kernel in (OWN_INT4, OWN_INT8)
                               and m.dense_weight is None for m in large)
