"""A batched int4 matmul for CPUs with AVX-512 VNNI, compiled from ``csrc/int4_mm.cpp`` on first use.

Why our own: torch's packed int4 CPU kernel works on tiles of 4 rows and unpacks the weight again
for each tile, so 8 rows (8 callers in one batch) cost ~3x one row, and it converts every 4-bit
code to bf16 before multiplying. This one does what llama.cpp does with a Q4_1 weight: each input
row is quantized to int8 per group of 32 (``q = round(x * 127 / amax)``), and the unsigned 4-bit
codes are multiplied with it exactly in int32 by VNNI dot products (64 products an instruction),
each block of codes unpacked once for up to 8 rows; each group's weight scale, input step and
weight minimum are then applied in fp32: ``out = scale * d * sum(code * q) + min * d * sum(q)``.
``parts=2`` adds a second int8 code per input for the first's rounding error (near-exact input,
~1.7x the work at 8 rows); speed.FINE_INPUT_PROJECTIONS names the layers that need it. Per layer on
the reference CPU, one part runs ~1.8x faster than this kernel's earlier bf16 version at one row
and ~1.5x at 8 rows; two parts about as fast as it (bench/findings.md).

It is built with torch's C++ extension loader (a compiler and ninja, ~40 s once per torch version,
cached in torch's extension directory and shared by every process). Where the CPU lacks AVX-512
VNNI, the build fails, or ``LLM_MODULE_INT4_KERNEL=0`` is set, :func:`kernel` returns None and the
packed layers use torch's own kernel.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

KERNEL_ENV = "LLM_MODULE_INT4_KERNEL"  # 0 turns the kernel off (torch's kernel is used)
SOURCE = Path(__file__).with_name("csrc") / "int4_mm.cpp"
MODULE_NAME = "llm_module_int4_q8"  # a new name per kernel design: an old build is never loaded
GROUP_SIZE = 32  # inputs per scale/minimum group, fixed by the kernel
BLOCK_COLUMNS = 16  # output columns per block, fixed by the kernel
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
LAYOUT = "llm_module-int4-v3"  # names the packed layout in the packed-weight cache's key: bump on change

_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}


def kernel() -> ModuleType | None:
    """The compiled kernel module, or None where it cannot run here (then torch's kernel is used)."""
    with _lock:
        if "module" not in _loaded:
            _loaded["module"] = _build()
        return _loaded["module"]


def _build() -> ModuleType | None:
    if os.environ.get(KERNEL_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if not _cpu_has(CPU_FLAGS):
        return None
    try:
        from torch.utils.cpp_extension import get_default_build_root, load

        # Per Python and torch version: a build against another torch's headers must not be loaded.
        tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()  # as torch's own loader
        build_dir = Path(root) / f"{MODULE_NAME}-{tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        _clear_stale_lock(build_dir / "lock")
        _put_ninja_on_path()
        return load(name=MODULE_NAME, sources=[str(SOURCE)], build_directory=str(build_dir),
                    extra_cflags=["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
                    extra_ldflags=["-fopenmp"])
    except Exception as exc:  # no compiler or ninja, an old compiler: torch's kernel still works
        log.warning("The int4 kernel could not be built (%s); packed layers use torch's kernel.", exc)
        return None


def _put_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; pip installs it beside this interpreter, which is not on
    PATH when a virtualenv's python is run by its full path (as ``make`` does)."""
    scripts = Path(sys.executable).parent
    if shutil.which("ninja") is None and (scripts / "ninja").exists():
        os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + str(scripts)


def _clear_stale_lock(lock: Path, stale_s: float = 600) -> None:
    """torch waits without a timeout while a build's lock file exists; one left by a build that was
    killed would hang every later setup, so a lock older than any real build is removed."""
    try:
        if time.time() - lock.stat().st_mtime > stale_s:
            log.warning("Removing a stale int4 kernel build lock %s", lock)
            lock.unlink()
    except FileNotFoundError:
        pass


def _cpu_has(flags: tuple[str, ...]) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to ask, so do not try
        return False
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    present = set(line.split(":", 1)[-1].split())
    return all(flag in present for flag in flags)


def fits(out_features: int, in_features: int, group_size: int) -> bool:
    return group_size == GROUP_SIZE and out_features % BLOCK_COLUMNS == 0 and in_features % GROUP_SIZE == 0


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


def matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
           parts: int = 1) -> torch.Tensor:
    """``x`` ``[rows, K]`` (read as float32, quantized in ``parts`` int8 parts: 1 or 2) times the
    packed weight: float32 ``[rows, N]``.

    Only for weights packed after :func:`kernel` returned the module.
    """
    return _loaded["module"].int4_mm(x.float().contiguous(), packed, scales, mins, parts)
