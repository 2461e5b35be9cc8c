"""Shared helpers of the bench suite: timing statistics, machine facts, prompts, servers, clients.

Everything here is plain Python over llm_module's public pieces (``Settings``, ``Engine``,
``llm-module serve``) and llama.cpp's own binaries (bench/setup_llama_server.sh); no figure is
computed here, only measured.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
LLAMA_VENV_PYTHON = BENCH_DIR / ".env" / "llama-venv" / "bin" / "python"  # llama-cpp-python (optional, old)
LLAMA_BIN = BENCH_DIR / ".env" / "llama.cpp" / "build" / "bin"  # native llama.cpp (setup_llama_server.sh)
LLAMA_SERVER = LLAMA_BIN / "llama-server"
LLAMA_BENCH = LLAMA_BIN / "llama-bench"
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


def percentile(values: list[float], pct: float) -> float:
    """The ``pct`` percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


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
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)


def chat_prompt(tokenizer, request: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": request}], add_generation_prompt=True,
                                         tokenize=False)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def greedy(new_tokens: int) -> dict:
    """Greedy decoding of exactly ``new_tokens`` tokens (end-of-sequence held back), as every engine here does."""
    return {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}


# ----------------------------------------------------------------------------------- settings, files
def shared_models_dir() -> Path:
    """The model cache every bench process shares (no GGUF re-conversion per run)."""
    from llm_module.settings import Settings

    return Settings().models_dir


def bench_settings(home: Path, **overrides):
    """Settings with a private home (state file, jobs) and the shared model cache."""
    from llm_module.settings import Settings

    return Settings(home=home, cache=shared_models_dir(), **overrides)


def make_engine(home: Path, **overrides):
    """A private engine on the default model, set up; ``overrides`` are Settings fields."""
    from llm_module.engine import Engine

    engine = Engine(bench_settings(home, **overrides))
    engine.setup()
    return engine


def load_reference_model():
    """The default model as transformers loads it: fp32, unpatched (the baselines' model)."""
    from llm_module.loader import load_model

    return load_model(models_dir=shared_models_dir())


def default_tokenizer():
    """The default model's tokenizer, without loading the model (for clients that render prompts)."""
    from transformers import AutoTokenizer

    from llm_module.loader import resolve_model_dir

    return AutoTokenizer.from_pretrained(resolve_model_dir(None, shared_models_dir())[1])


def make_adapters(root: Path, count: int, *, strength: float = 0.01, seed: int = 0,
                  targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"), r: int = 8,
                  prefix: str = "a") -> list[Path]:
    """``count`` LoRA adapters for the default model with random weights (lora_B ~ N(0, strength)), in
    ``root/<prefix><i>``; one PEFT wrapper re-randomized per adapter, so 64 take seconds, not minutes.

    Run it in a short-lived thread (runtime.threads.run_in_fresh_thread) from a long-lived one."""
    import torch
    from peft import LoraConfig, get_peft_model

    base = load_reference_model().model
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                 task_type="CAUSAL_LM"))
    paths = []
    with torch.no_grad():
        for index in range(count):
            generator = torch.Generator().manual_seed(seed + index)
            for name, param in peft_model.named_parameters():
                if "lora_A" in name:  # peft's own init range (kaiming-uniform), redrawn per adapter
                    bound = 1 / param.shape[1] ** 0.5
                    param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * bound)
                elif "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * strength)
            path = root / f"{prefix}{index}"
            peft_model.save_pretrained(str(path))
            paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> dict:
    """Resident memory of a process now and at its peak, MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) / 1024
    return {"peak_mib": fields["VmHWM"], "now_mib": fields["VmRSS"]}


class Server:
    """A process serving HTTP on 127.0.0.1 (ours or llama.cpp's); stopped on exit of a ``with``."""

    probe = "/readyz"
    label = "server"

    def __init__(self, command: list[str], workdir: Path, env: dict | None = None, timeout: float = 600) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.command = command
        self.log_path = workdir / "server.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(command, env=env, cwd=workdir, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if requests.get(self.url + self.probe, timeout=2).status_code == 200:
                    return
            except requests.RequestException:  # refused while starting, or slow while the model loads
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.label} not ready within {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss(self) -> dict:
        return rss_mib(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class OurServer(Server):
    """``llm-module serve`` on the default model with ``flags``; a private home, the shared model cache."""

    label = "llm-module serve"

    def __init__(self, workdir: Path, *flags: str, timeout: float = 600) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.flags = list(flags)
        env = {**os.environ, "LLM_MODULE_HOME": str(workdir / "home"), "LLM_MODULE_CACHE": str(shared_models_dir()),
               "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "llm_module", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--log-level", "warning", *flags]
        super().__init__(command, workdir, env, timeout)

    def describe(self) -> dict:
        import requests

        return requests.get(self.url + "/v1/model", timeout=30).json()


def llama_server_built() -> bool:
    return LLAMA_SERVER.exists() and os.access(LLAMA_SERVER, os.X_OK)


def llama_bench_built() -> bool:
    return LLAMA_BENCH.exists() and os.access(LLAMA_BENCH, os.X_OK)


class LlamaServer(Server):
    """llama.cpp's native ``llama-server`` on the same GGUF: ``slots`` parallel sequences, continuous batching."""

    probe = "/health"
    label = "llama-server"

    def __init__(self, workdir: Path, *, slots: int = 8, context: int = 8192, threads: int = 2,
                 timeout: float = 300) -> None:
        from llm_module.loader import default_gguf_path

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.slots, self.context, self.threads = slots, context, threads
        self.flags = ["-np", str(slots), "-c", str(context), "--cont-batching", "-t", str(threads), "-tb", str(threads)]
        command = [str(LLAMA_SERVER), "-m", str(default_gguf_path()), "--host", "127.0.0.1", "--port", str(self.port),
                   *self.flags]
        env = {**os.environ, "LD_LIBRARY_PATH": f"{LLAMA_BIN}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
        super().__init__(command, workdir, env, timeout)

    def describe(self) -> str:
        return f"llama-server {' '.join(self.flags)} (same GGUF)"


# ------------------------------------------------------------------------------------------ clients
def sse_events(response):
    """(event name, data) of a server-sent-events response as the lines arrive."""
    event = "message"
    for raw in response.iter_lines(chunk_size=None):
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if not line:
            event = "message"
            continue
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            yield event, line[5:].strip()


def stream_ours(session, url: str, body: dict, timeout: float = 600) -> dict:
    """POST /v1/generate/stream: seconds to the first text piece and to the end, and the text."""
    start = time.perf_counter()
    first, text, pieces = None, "", 0
    with session.post(f"{url}/v1/generate/stream", json=body, stream=True, timeout=timeout) as response:
        response.raise_for_status()
        for event, data in sse_events(response):
            if event == "error":
                raise RuntimeError(f"stream error: {data}")
            if event == "done":
                break
            piece = json.loads(data).get("text", "")
            if piece:
                pieces += 1
                text += piece
                if first is None:
                    first = time.perf_counter() - start
    return {"first_s": first, "seconds": time.perf_counter() - start, "text": text, "pieces": pieces}


def stream_openai_chat(session, url: str, body: dict, timeout: float = 600) -> dict:
    """POST /v1/chat/completions with stream=true (usage included): first content, end, tokens."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = finish = None
    text, tokens = "", None
    with session.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=timeout) as response:
        response.raise_for_status()
        for _event, data in sse_events(response):
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"stream error: {data}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                finish = choice.get("finish_reason") or finish
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece:
                    now = time.perf_counter() - start
                    first = now if first is None else first
                    last = now
                    text += piece
    return {"first_s": first, "last_s": last, "seconds": time.perf_counter() - start, "text": text,
            "tokens": tokens, "finish_reason": finish}


def stream_llama(session, url: str, prompt: str, new_tokens: int, timeout: float = 600, **sampling) -> dict:
    """llama-server's POST /completion, streamed: exactly ``new_tokens`` greedy tokens (ignore_eos)."""
    body = {"prompt": prompt, "n_predict": new_tokens, "ignore_eos": True, "stream": True, "temperature": 0,
            "top_k": 1, **sampling}
    start = time.perf_counter()
    first, text, tokens = None, "", None
    with session.post(f"{url}/completion", json=body, stream=True, timeout=timeout) as response:
        response.raise_for_status()
        for _event, data in sse_events(response):
            chunk = json.loads(data)
            piece = chunk.get("content", "")
            if piece:
                text += piece
                if first is None:
                    first = time.perf_counter() - start
            if chunk.get("stop"):
                tokens = (chunk.get("timings") or {}).get("predicted_n") or chunk.get("tokens_predicted")
                break
    return {"first_s": first, "seconds": time.perf_counter() - start, "text": text, "tokens": tokens}


def post_json(session, url: str, path: str, body: dict, timeout: float = 600) -> tuple[float, dict]:
    """(seconds, answer) of a JSON POST that must succeed."""
    start = time.perf_counter()
    response = session.post(f"{url}{path}", json=body, timeout=timeout)
    seconds = time.perf_counter() - start
    if response.status_code >= 400:
        raise RuntimeError(f"POST {path} answered {response.status_code}: {response.text[:500]}")
    return seconds, response.json()


def run_parallel(fn: Callable[[int], object], count: int) -> tuple[float, list]:
    """Run ``fn(0..count-1)`` in ``count`` threads started together; (wall seconds, results in order)."""
    import threading

    results: list = [None] * count
    errors: list[BaseException] = []
    barrier = threading.Barrier(count + 1)

    def work(index: int) -> None:
        barrier.wait()
        try:
            results[index] = fn(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return wall, results
