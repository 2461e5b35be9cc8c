"""Shared helpers of the bench suite: timing statistics, machine facts, the default prompt."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
LLAMA_VENV_PYTHON = BENCH_DIR / ".env" / "llama-venv" / "bin" / "python"
RESULT_PREFIX = "RESULT "

# One chat turn whose answer runs past 128 tokens, so every engine generates the same length.
STORY_REQUEST = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."
PROMPTS = [
    "Write a haiku about the sea.", "Explain photosynthesis to a child.", "List three uses of copper.",
    "Why is the sky blue?", "Give me a recipe for pancakes.", "Describe the water cycle.",
    "Summarize the plot of Hamlet.", "What makes a good teacher?",
]


@dataclass
class Stats:
    """Median with min and max of repeated measurements."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def text(self, digits: int = 1) -> str:
        return f"{self.median:.{digits}f} ({min(self.values):.{digits}f}–{max(self.values):.{digits}f})"

    def to_dict(self) -> dict:
        return {"median": self.median, "min": min(self.values), "max": max(self.values), "n": len(self.values)}


def ratio(value: Stats | float, baseline: Stats | float) -> str:
    v = value.median if isinstance(value, Stats) else value
    b = baseline.median if isinstance(baseline, Stats) else baseline
    return f"{v / b:.2f}×" if b else "n/a"


def time_calls(call: Callable[[], object], repeat: int, warmup: int = 1) -> Stats:
    """Seconds per call, each call timed on its own."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return Stats(times)


def machine() -> dict:
    import torch
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}
    for name in ("peft", "jaseci"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:
            pass
    return {
        "cpu": cpu, "cores": len(os.sched_getaffinity(0)),
        "isa": [f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f" {f}" in flags],
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch_threads": torch.get_num_threads(), "versions": versions, "load_average": os.getloadavg(),
    }


def emit(result: dict) -> None:
    """Hand a section's figures to bench/run.py (one line on stdout)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def chat_prompt(tokenizer, request: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": request}], add_generation_prompt=True,
                                         tokenize=False)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
