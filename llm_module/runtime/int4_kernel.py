"""llm_module's own CPU matmuls: int4 weights (the model's linear layers) and int8 weights (the
output head), built from ``csrc/`` when the package is installed, for AVX-512 VNNI
(``cpu_kernels.cpp``) and for AVX2 (``cpu_kernels_avx2.cpp``, the same results on CPUs without it).

Why our own: torch's packed int4 CPU kernel works on tiles of 4 rows and unpacks the weight again
for each tile, so 8 rows (8 callers in one batch) cost ~3x one row, and it converts every 4-bit
code to bf16 before multiplying. torch's int8 kernel (``_weight_int8pack_mm``) takes bf16 inputs
and rounds its output to bf16, which at logits near 25 is a step of 0.125: near-tie tokens became
exact ties (the demo's "What is the capital of France?" answered in French); its fp32 variant is
4-15x slower. These kernels do what llama.cpp does with Q4_1 and Q8_0 weights: each input row is
quantized to int8 per group of 32 (``q = round(x * 127 / amax)``), and the weight codes are
multiplied with it exactly in int32 by VNNI dot products (64 products an instruction), each block
of weights read once for up to 8 rows; each group's scales (and for int4 its minimum) are then
applied in fp32, and the output is float32:

* int4: ``out = scale * d * sum(code * q) + min * d * sum(q)``
* int8: ``out = scale * d * sum(w * q)``, ``w`` signed int8 with one scale per 32 inputs (Q8_0).

``parts=2`` adds a second int8 code per input for the first's rounding error (near-exact input,
more work at 8 rows); quantize.FINE_INPUT_PROJECTIONS names the layers that need it. The measured
speed of each version is in bench/findings.md.

The kernels are compiled by ``setup.py`` into ``llm_module/runtime/_cpu_kernels*.so`` (torch's
``CppExtension``; the build needs torch importable: ``pip install --no-build-isolation``) and are
only imported here, never compiled at run time. :func:`kernel` takes the first of ``BUILDS``
whose instructions this CPU has (checked before the import: a library may hold its instructions
anywhere) and which this install has; where none fits (another CPU, no compiler at install time,
a build against another torch) it returns None, one log line says why, and the packed layers use
torch's kernels (the ``int4_kernel`` setting turns ours off on purpose). After editing the C++
sources of a checkout, rebuild them with ``pip install --no-build-isolation --no-deps -e .``.
"""

from __future__ import annotations

import importlib
import logging
import threading
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

# (module built by setup.py, the CPU flags it needs, its instruction set), best first.
BUILDS = (
    ("llm_module.runtime._cpu_kernels", ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"), "AVX-512 VNNI"),
    ("llm_module.runtime._cpu_kernels_avx2", ("avx2", "fma", "f16c"), "AVX2"),
)
KERNEL_VERSION = 6  # must equal the built modules' VERSION (kVersion in csrc/*.cpp)
GROUP_SIZE = 32  # inputs per scale/minimum group, fixed by the kernel
BLOCK_COLUMNS = 16  # output columns per block, fixed by the kernel
CPU_FLAGS = BUILDS[0][1]
# Names the packed layouts (int4 and int8) in the packed-weight cache's key: bump on any change.
LAYOUT = "llm_module-int4-v3-int8-v1"

_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}
_why_not: list[str] = []  # why kernel() returned None (or a better build was not used), for describe()


def kernel() -> ModuleType | None:
    """The compiled kernel module, or None where it cannot run here (then torch's kernels are used)."""
    with _lock:
        if "module" not in _loaded:
            _loaded["module"] = _load()
        return _loaded["module"]


def describe(enabled: bool = True) -> str:
    """Which kernel runs int4 layers here, for logs and /v1/model."""
    if not enabled:
        return "torch (llm_module's kernel turned off by the int4_kernel setting)"
    module = kernel()
    if module is not None:
        return f"llm_module int4 ({module.ISA})"
    return f"torch ({_why_not[0] if _why_not else 'llm_module kernel unavailable'})"


def _load() -> ModuleType | None:
    _why_not.clear()
    fitting = [build for build in BUILDS if _cpu_has(build[1])]
    if not fitting:
        _why_not.append(f"this CPU lacks {' and '.join(isa for _, _, isa in BUILDS)}")
        log.info("%s: packed layers use torch's kernels.", _why_not[0])
        return None
    for name, _, isa in fitting:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # not built at install time, or built against another torch
            _not_used(f"llm_module's {isa} kernel is not built in this install",
                      f"{exc}; reinstall with a C++ compiler and torch importable: "
                      "pip install --no-build-isolation -e .")
            continue
        version = getattr(module, "VERSION", None)
        if version != KERNEL_VERSION:  # e.g. an in-place build of older sources left in a checkout
            _not_used(f"llm_module's built {isa} kernel is from other sources",
                      f"{module.__file__} has version {version}, this code needs {KERNEL_VERSION}; "
                      "rebuild it: pip install --no-build-isolation --no-deps -e .")
            continue
        log.info("llm_module's CPU kernels (%s) loaded from %s", isa, module.__file__)
        return module
    log.warning("No llm_module CPU kernel can run here (%s): packed layers use torch's kernels.", "; ".join(_why_not))
    return None


def _not_used(reason: str, detail: str) -> None:
    _why_not.append(reason)
    log.warning("%s (%s)", reason, detail)


def _cpu_has(flags: tuple[str, ...]) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to ask, so do not try
        return False
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    present = set(line.split(":", 1)[-1].split())
    return all(flag in present for flag in flags)


def fits(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether an int4 layer of this shape fits the kernel (else torch's kernel runs it)."""
    return group_size == GROUP_SIZE and out_features % BLOCK_COLUMNS == 0 and in_features % GROUP_SIZE == 0


def fits_int8(out_features: int, in_features: int) -> bool:
    """Whether an int8 layer of this shape fits the kernel (any output count: the last block is padded)."""
    return out_features > 0 and in_features % GROUP_SIZE == 0


def pack(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kernel's layout of 4-bit ``codes`` ``[N, K]`` (0-15) with per-group ``scales`` and ``mins``
    ``[N, K/32]`` (``w = code * scale + min``): (packed, scales, mins). Scales and minimums are
    kept in float16, a GGUF Q4 block's own precision (torch's kernel keeps them in bf16)."""
    n, k = codes.shape
    blocks, groups = n // BLOCK_COLUMNS, k // GROUP_SIZE
    # Per block and group, inputs 0-15 and 16-31 as 4 chunks (4 inputs x 16 columns, column-major
    # fours) each: one chunk's low and high nibbles are the two halves' VNNI operands.
    fours = codes.to(torch.uint8).view(blocks, BLOCK_COLUMNS, groups, 2, 4, 4)
    fours = fours.permute(0, 2, 3, 4, 1, 5).reshape(blocks, groups, 2, 4, 64)
    packed = (fours[:, :, 0] | (fours[:, :, 1] << 4)).contiguous()

    def by_block(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float16).view(blocks, BLOCK_COLUMNS, groups).permute(0, 2, 1).contiguous()

    return packed, by_block(scales), by_block(mins)


def pack_int8(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's layout of int8 ``codes`` ``[N, K]`` (-128..127) with one scale per group of 32
    inputs ``[N, K/32]`` (``w = code * scale``): (packed ``[N/16, K/32, 8, 64]`` uint8, each code
    plus 128; scales ``[N/16, K/32, 16]`` float16, a GGUF Q8_0 block's own precision). N is
    padded to a multiple of 16 with zero columns, which the kernel computes but never returns."""
    n, k = codes.shape
    blocks, groups = -(-n // BLOCK_COLUMNS), k // GROUP_SIZE
    pad = blocks * BLOCK_COLUMNS - n
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad, k)])
        scales = torch.cat([scales, scales.new_zeros(pad, groups)])
    # Per block and group, 8 chunks of (16 columns x 4 inputs), column-major fours: a VNNI operand each.
    unsigned = (codes.to(torch.int16) + 128).to(torch.uint8)
    packed = unsigned.view(blocks, BLOCK_COLUMNS, groups, 8, 4).permute(0, 2, 3, 1, 4).reshape(blocks, groups, 8, 64)
    by_block = scales.to(torch.float16).view(blocks, BLOCK_COLUMNS, groups).permute(0, 2, 1)
    return packed.contiguous(), by_block.contiguous()


def matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
           parts: int = 1) -> torch.Tensor:
    """``x`` ``[rows, K]`` (read as float32, quantized in ``parts`` int8 parts: 1 or 2) times the
    packed int4 weight: float32 ``[rows, N]``.

    Only for weights packed after :func:`kernel` returned the module.
    """
    return _loaded["module"].int4_mm(x.float().contiguous(), packed, scales, mins, parts)


def matmul_int8(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, out_features: int,
                parts: int = 1) -> torch.Tensor:
    """``x`` ``[rows, K]`` (read as float32, quantized in ``parts`` int8 parts) times the weight
    :func:`pack_int8` packed: float32 ``[rows, out_features]``.

    Only for weights packed after :func:`kernel` returned the module.
    """
    return _loaded["module"].int8_mm(x.float().contiguous(), packed, scales, out_features, parts)
