"""In-process speed figures of llm_module, each beside its baseline from the same run.

    python bench/bench_speed.py SECTION [--new-tokens 128 --repeat 3 ...]

Sections (bench/run.py runs them all, each in its own process, and writes bench/README.md):
  single       single-stream tokens/s: llm.generate vs raw model.generate (fp32) vs the text-generation
               pipeline vs llama.cpp on the same GGUF; time to first token
  overhead     per-call cost of the action layer with a zero-cost model
  concurrency  aggregate tokens/s with 1/4/8 caller threads, batcher on/off, base model or 8 adapters mixed
  setup        cold (GGUF conversion) and warm setup, adapter load/unload
  memory       peak resident memory of `llm-module serve` with the default model, bare and with 8 adapters
  quality      held-out perplexity and greedy agreement of the served (quantized) model vs fp32
Each prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BENCH_DIR,
    LLAMA_VENV_PYTHON,
    PROMPTS,
    STORY_REQUEST,
    Stats,
    chat_prompt,
    emit,
    log,
    machine,
    time_calls,
)

from llm_module.threads import run_in_fresh_thread  # noqa: E402

WORKDIR = Path(tempfile.mkdtemp(prefix="llm-bench-"))


def make_engine(*, batching: bool = True, quantize: str | None = None, window_s: float = 0.0):
    """A private engine (its own state file) on the default model; ``quantize`` overrides the policy."""
    from llm_module.engine import Engine
    from llm_module.state import StateFile

    if quantize is not None:
        os.environ["LLM_MODULE_QUANTIZE"] = quantize
    try:
        engine = Engine(batching=batching, batch_window_s=window_s,
                        state_file=StateFile(WORKDIR / f"state-{time.monotonic_ns()}.json"))
        engine.setup()
    finally:
        os.environ.pop("LLM_MODULE_QUANTIZE", None)
    return engine


def greedy(new_tokens: int) -> dict:
    return {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}


# ------------------------------------------------------------------------------------------- single
def single(args) -> dict:
    import torch
    from transformers import pipeline

    from llm_module import llm
    from llm_module.engine import set_default_engine
    from llm_module.loader import load_model

    # Baselines run in short-lived threads, never this long-lived one: a second long-lived torch thread
    # beside the engine's worker makes libgomp stop spin-waiting and halves everyone's speed
    # (llm_module/threads.py); in a process of its own each baseline would run as fast as it does here.
    raw = run_in_fresh_thread(load_model)
    tokenizer, model = raw.tokenizer, raw.model
    prompt = chat_prompt(tokenizer, STORY_REQUEST)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    options = greedy(args.new_tokens)
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    served = make_engine()
    set_default_engine(served)
    unquantized = make_engine(quantize="none", batching=False)

    def raw_generate(new_tokens=args.new_tokens):
        with torch.inference_mode():
            model.generate(**enc, **greedy(new_tokens), pad_token_id=tokenizer.pad_token_id)

    def fresh(call):
        return lambda: run_in_fresh_thread(call)

    runs = {
        "raw model.generate fp32": fresh(raw_generate),
        "transformers pipeline fp32": fresh(lambda: pipe(prompt, **options, return_full_text=False)),
        "llm.generate": lambda: llm.generate(prompt, **options),
        "llm.generate, quantization off": fresh(lambda: unquantized.generate(prompt, **options)),
    }
    llama = LlamaCpp.start(prompt, args.new_tokens)
    if llama is not None:  # its turns come between the others', so the machine's swings hit all alike
        runs[LLAMA_CPP_RUN] = llama.run
    rates = interleaved(runs, args.repeat, tokens=args.new_tokens)
    first_token = {
        "raw model.generate fp32": time_calls(fresh(lambda: raw_generate(1)), args.repeat * 3),
        "llm.generate, max_new_tokens=1": time_calls(lambda: llm.generate(prompt, **greedy(1)), args.repeat * 3),
        "llm.generate stream, first text piece (word boundary)": Stats(
            [first_piece_seconds(served, prompt) for _ in range(args.repeat * 3)]),
    }
    result = {"rates": {k: v.to_dict() for k, v in rates.items() if k != LLAMA_CPP_RUN},
              "first_token_s": {k: v.to_dict() for k, v in first_token.items()},
              "new_tokens": args.new_tokens, "prompt_tokens": enc["input_ids"].shape[1], "machine": machine()}
    if llama is None:
        result.update({"llama_cpp": None, "llama_cpp_note": "not built: run bench/setup_llama_cpp.sh"})
    else:
        result.update({"llama_cpp": rates[LLAMA_CPP_RUN].to_dict(), "llama_cpp_interleaved": True,
                       "llama_cpp_first_token_s": Stats(llama.first_token_s).to_dict(),
                       "llama_cpp_generated": llama.generated})
        llama.close()
    return result


def first_piece_seconds(engine, prompt: str) -> float:
    """Seconds until the stream yields its first text; the rest is drained so the model is free again."""
    start = time.perf_counter()
    pieces = engine.stream(prompt, **greedy(4))
    next(pieces)
    elapsed = time.perf_counter() - start
    for _ in pieces:
        pass
    return elapsed


def interleaved(runs: dict, repeat: int, tokens: int) -> dict[str, Stats]:
    """Tokens/s of each run, one of each in turn, so load from other processes hits all alike."""
    for call in runs.values():
        call()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, call in runs.items():
            start = time.perf_counter()
            call()
            times[name].append(tokens / (time.perf_counter() - start))
    return {name: Stats(values) for name, values in times.items()}


LLAMA_CPP_RUN = "llama.cpp"


class LlamaCpp:
    """llama.cpp on the same GGUF in its own process (bench/llama_cpp_worker.py --serve): one run a call."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.first_token_s: list[float] = []
        self.generated = 0

    @classmethod
    def start(cls, prompt: str, new_tokens: int) -> LlamaCpp | None:
        built = LLAMA_VENV_PYTHON.exists() and subprocess.run(
            [str(LLAMA_VENV_PYTHON), "-c", "import llama_cpp"], capture_output=True).returncode == 0
        if not built:
            return None
        from llm_module.loader import default_gguf_path

        prompt_file = WORKDIR / "prompt.txt"
        prompt_file.write_text(prompt, encoding="utf-8")
        command = [str(LLAMA_VENV_PYTHON), str(BENCH_DIR / "llama_cpp_worker.py"), str(default_gguf_path()),
                   str(prompt_file), "--new-tokens", str(new_tokens), "--serve"]
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        worker = cls(proc)
        worker._answer()  # loaded and warmed up
        return worker

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp worker ended (exit code {self.proc.wait()})")
        return json.loads(line)

    def run(self) -> None:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        figures = self._answer()
        self.first_token_s.append(figures["first_token_s"])
        self.generated = figures["generated"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ----------------------------------------------------------------------------------------- overhead
def overhead(args) -> dict:
    """The action layer's own cost: llm.generate with model.generate replaced by an instant stub."""
    import torch

    from llm_module import llm
    from llm_module.engine import set_default_engine

    figures = {}
    for batching in (True, False):
        engine = make_engine(batching=batching)
        set_default_engine(engine)

        def instant(input_ids, attention_mask=None, **_):
            return torch.cat([input_ids, input_ids[:, -1:]], dim=1)

        engine._model.generate = instant  # type: ignore[method-assign]
        stub = time_calls(lambda: instant(torch.ones(1, 8, dtype=torch.long)), args.calls, warmup=5)
        call = time_calls(lambda: llm.generate("Hello there", max_new_tokens=1, do_sample=False), args.calls, 5)
        figures["batcher on" if batching else "batcher off"] = {
            "call_ms": ms(call), "stub_ms": ms(stub), "overhead_ms": (call.median - stub.median) * 1000}
        engine.close()
    return {"overhead": figures}


def ms(stats: Stats) -> dict:
    return {k: (v * 1000 if k != "n" else v) for k, v in stats.to_dict().items()}


# -------------------------------------------------------------------------------------- concurrency
def make_adapters(count: int) -> list[Path]:
    """LoRA adapters for the default model with random lora_B, so each changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model

    from llm_module.loader import load_model

    base = load_model().model
    paths = []
    for index in range(count):
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
        path = WORKDIR / f"adapter-{index}"
        peft_model.save_pretrained(str(path))
        paths.append(path)
    return paths


def aggregate_rate(engine, callers: int, calls: int, new_tokens: int, adapters: list[str] | None) -> float:
    """Generated tokens/s of ``callers`` threads each making ``calls`` generate calls back to back."""
    def caller(index: int) -> None:
        for i in range(calls):
            adapter = adapters[index % len(adapters)] if adapters else None
            engine.generate(PROMPTS[(index + i) % len(PROMPTS)], chat=True, adapter=adapter, **greedy(new_tokens))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return callers * calls * new_tokens / (time.perf_counter() - start)


@contextlib.contextmanager
def peft_mixed_path(enabled: bool):
    """The baseline for mixed adapters: peft's own ``adapter_names=`` loop instead of llm_module's stacking."""
    from llm_module import lora_batch

    stackable = lora_batch.can_stack
    if enabled:
        lora_batch.can_stack = lambda model, adapters: False
    try:
        yield
    finally:
        lora_batch.can_stack = stackable


def concurrency(args) -> dict:
    adapter_paths = run_in_fresh_thread(make_adapters, args.adapters)  # not in this long-lived thread
    names = [f"a{i}" for i in range(len(adapter_paths))]
    levels = [int(c) for c in args.callers.split(",")]
    table: dict[str, dict[str, list[float]]] = {}
    for batching in (True, False):
        engine = make_engine(batching=batching, window_s=args.window_ms / 1000)
        for name, path in zip(names, adapter_paths, strict=True):
            engine.load_adapter(str(path), name)
        aggregate_rate(engine, 2, 1, 4, names)  # warm-up, adapters included
        mixes = ("base", "adapters", "adapters via peft") if batching else ("base", "adapters")
        for mix in mixes:
            key = f"{mix}, batcher {'on' if batching else 'off'}"
            table[key] = {str(n): [] for n in levels}
            with peft_mixed_path(mix == "adapters via peft"):
                for _ in range(args.repeat):
                    for n in levels:
                        table[key][str(n)].append(aggregate_rate(engine, n, args.calls, args.new_tokens,
                                                                 None if mix == "base" else names))
            log(f"{key}: {table[key]}")
        engine.close()
    return {"concurrency": {k: {n: Stats(v).to_dict() for n, v in row.items()} for k, row in table.items()},
            "new_tokens": args.new_tokens, "calls_per_caller": args.calls, "window_ms": args.window_ms}


# -------------------------------------------------------------------------------------------- setup
def setup(args) -> dict:
    from llm_module.engine import Engine
    from llm_module.state import StateFile

    engine = Engine(state_file=StateFile(WORKDIR / "setup-state.json"))
    warm = time_calls(engine.setup, args.repeat, warmup=1)
    adapter = run_in_fresh_thread(make_adapters, 1)[0]
    load, unload = [], []
    for _ in range(args.repeat * 3):
        start = time.perf_counter()
        engine.load_adapter(str(adapter), "bench")
        load.append(time.perf_counter() - start)
        start = time.perf_counter()
        engine.unload_adapter("bench")
        unload.append(time.perf_counter() - start)
    # A second adapter on a model that already has one: peft adds layers instead of wrapping the model.
    engine.load_adapter(str(adapter), "first")
    second = time_calls(lambda: (engine.load_adapter(str(adapter), "bench"), engine.unload_adapter("bench")),
                        args.repeat * 3)
    figures = {"warm_setup_s": warm.to_dict(), "adapter_load_s": Stats(load).to_dict(),
               "adapter_unload_s": Stats(unload).to_dict(), "second_adapter_load_unload_s": second.to_dict(),
               "import_s": import_seconds()}
    if not args.skip_cold:
        os.environ["LLM_MODULE_CACHE"] = str(WORKDIR / "cold-cache")
        start = time.perf_counter()
        Engine(state_file=StateFile(WORKDIR / "cold-state.json")).setup()
        figures["cold_setup_s"] = time.perf_counter() - start
    return figures


def import_seconds() -> float:
    """A fresh interpreter importing the action module and torch + transformers (what jsctl pays first)."""
    code = "import llm_module.llm, torch, transformers, peft"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------- memory
def memory(args) -> dict:
    import requests

    paths = make_adapters(args.adapters)
    figures = {}
    for label, adapters in (("no adapters", []), (f"{len(paths)} adapters", paths)):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "llm_module", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning"]
        for i, path in enumerate(adapters):
            cmd += ["--adapter", f"a{i}={path}"]
        env = {**os.environ, "LLM_MODULE_HOME": str(WORKDIR / f"home-{len(adapters)}")}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, proc)
            names = [f"a{i}" for i in range(len(adapters))] or [None] * 8
            threads = [threading.Thread(target=lambda n=n, u=url: requests.post(
                f"{u}/v1/generate", json={"prompt": PROMPTS[0], "adapter": n, **greedy(16)}, timeout=600))
                for n in names]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            figures[label] = peak_rss_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return {"memory_mib": figures}


def wait_ready(url: str, proc, timeout: float = 600) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if requests.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become ready")


def peak_rss_mib(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) / 1024
    return {"peak_mib": fields["VmHWM"], "now_mib": fields["VmRSS"]}


# ------------------------------------------------------------------------------------------ quality
def perplexity(model, tokenizer, text: str, window: int = 256) -> float:
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, ids.shape[1] - 1, window):
            chunk = ids[:, start:start + window + 1]
            logits = model(chunk[:, :-1]).logits
            total += float(torch.nn.functional.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum"))
            count += chunk.shape[1] - 1
    return math.exp(total / count)


def quality(args) -> dict:
    import torch

    from llm_module.loader import load_model
    from llm_module.speed import quantize_linears

    loaded = load_model()
    tokenizer, reference = loaded.tokenizer, loaded.model
    text = (BENCH_DIR / "data" / "heldout.txt").read_text(encoding="utf-8")
    figures = {"fp32": {"perplexity": perplexity(reference, tokenizer, text)}}
    enc = tokenizer([chat_prompt(tokenizer, p) for p in PROMPTS], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    with torch.inference_mode():
        want = reference.generate(**enc, **greedy(args.new_tokens), pad_token_id=tokenizer.pad_token_id)
    # Perplexity reads 256-token windows: the packed kernel, or with the dense copy the bf16 weights
    # prompts are read with (decoding always uses the packed kernel).
    for name, mode, dense in (("int8", "int8", False), ("int4", "int4", False),
                              ("int4, bf16 prefill copy", "int4", True)):
        model = copy.deepcopy(reference)
        quantize_linears(model, mode, dense_prefill=dense)
        with torch.inference_mode():
            got = model.generate(**enc, **greedy(args.new_tokens), pad_token_id=tokenizer.pad_token_id)
        same_prefix = [first_difference(a, b) - enc["input_ids"].shape[1] for a, b in zip(got, want, strict=True)]
        figures[name] = {"perplexity": perplexity(model, tokenizer, text),
                         "identical_greedy_texts": sum(p >= args.new_tokens for p in same_prefix),
                         "mean_identical_tokens": sum(same_prefix) / len(same_prefix)}
    return {"quality": figures, "new_tokens": args.new_tokens, "texts": len(PROMPTS)}


def first_difference(a, b) -> int:
    diff = (a != b).nonzero()
    return int(diff[0]) if len(diff) else len(a)


SECTIONS = {"single": single, "overhead": overhead, "concurrency": concurrency, "setup": setup,
            "memory": memory, "quality": quality}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=sorted(SECTIONS))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200, help="overhead: calls; concurrency: calls per caller")
    parser.add_argument("--callers", default="1,4,8")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--window-ms", type=float, default=0.0)
    parser.add_argument("--skip-cold", action="store_true")
    args = parser.parse_args()
    from llm_module.paths import model_cache_dir

    # A private home (state file) but the shared model cache: no GGUF re-conversion per run.
    os.environ.setdefault("LLM_MODULE_CACHE", str(model_cache_dir()))
    os.environ.setdefault("LLM_MODULE_HOME", str(WORKDIR / "home"))
    log(f"{args.section} starting (load average {os.getloadavg()[0]:.1f})")
    emit({"section": args.section, **SECTIONS[args.section](args), "load_average_end": os.getloadavg()})


if __name__ == "__main__":
    main()
