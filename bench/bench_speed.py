"""In-process speed figures of llm_module, each beside its baseline from the same run.

    python bench/bench_speed.py SECTION [--new-tokens 128 --repeat 3 ...]

Sections (bench/run.py runs them all, each in its own process, and writes bench/README.md):
  single       single-stream tokens/s: llm.generate vs raw model.generate (fp32) vs the text-generation
               pipeline vs native llama.cpp (llama-bench, same GGUF, same threads), runs in turn; time to
               first token
  threads      llm.generate tokens/s in a clean process vs a process whose main thread first ran foreign
               torch work vs one where another long-lived thread ran a torch model (each its own process)
  overhead     per-call cost of the action layer with a zero-cost model (the runner's forward stubbed)
  concurrency  aggregate tokens/s with 1/4/8 caller threads: the serving core (base model, 8 adapters mixed,
               8 adapters through peft's per-adapter forward) vs the same core one row at a time (max_batch 1)
  setup        cold (GGUF conversion) and warm setup, adapter load/unload
  memory       peak resident memory of `llm-module serve` with the default model, bare and with 8 adapters
  quality      held-out perplexity and greedy agreement of the served (quantized) model vs fp32
Each prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BENCH_DIR,
    LLAMA_BENCH,
    LLAMA_BIN,
    LLAMA_VENV_PYTHON,
    PROMPTS,
    STORY_REQUEST,
    OurServer,
    Stats,
    bench_settings,
    chat_prompt,
    emit,
    greedy,
    llama_bench_built,
    load_reference_model,
    log,
    machine,
    make_adapters,
    make_engine,
    time_calls,
)

from llm_module.runtime.threads import run_in_fresh_thread  # noqa: E402

WORKDIR = Path(tempfile.mkdtemp(prefix="llm-bench-"))
# A serving thread ends after 1 s idle (serving/scheduler.py): waiting this long between two engines' work
# keeps one long-lived torch thread alive at a time (two make libgomp stop spin-waiting: runtime/threads.py).
IDLE_EXIT_S = 1.2


def home(name: str) -> Path:
    return WORKDIR / f"home-{name}-{time.monotonic_ns()}"


def use_default_engine(engine) -> None:
    """Make ``engine`` the one the jaseci actions (``llm_module.llm``) use."""
    from llm_module import llm

    llm._engine = engine


# ------------------------------------------------------------------------------------------- single
def single(args) -> dict:
    import torch
    from transformers import pipeline

    from llm_module import llm

    # Baselines run in short-lived threads, never this long-lived one: a second long-lived torch thread
    # beside the engine's serving thread makes libgomp stop spin-waiting and slows both
    # (llm_module/runtime/threads.py); in a process of its own each baseline would run as fast as it does here.
    raw = run_in_fresh_thread(load_reference_model)
    tokenizer, model = raw.tokenizer, raw.model
    prompt = chat_prompt(tokenizer, STORY_REQUEST)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    options = greedy(args.new_tokens)
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    served = make_engine(home("single"))
    use_default_engine(served)
    unquantized = make_engine(home("single-fp32"), quantize="none")

    def raw_generate(new_tokens=args.new_tokens):
        with torch.inference_mode():
            model.generate(**enc, **greedy(new_tokens), pad_token_id=tokenizer.pad_token_id)

    def fresh(call):
        return lambda: run_in_fresh_thread(call)

    runs = {
        "raw model.generate fp32": fresh(raw_generate),
        "transformers pipeline fp32": fresh(lambda: pipe(prompt, **options, return_full_text=False)),
        "llm.generate": lambda: llm.generate(prompt, **options),
        "llm.generate, quantization off (--quantize none)": lambda: unquantized.generate(prompt, **options),
    }
    avx2 = avx2_kernel()
    if avx2 is not None:  # the AVX2 build on the same packed weights: what a CPU without AVX-512 gets
        runs[AVX2_RUN] = lambda: with_kernel(avx2, lambda: llm.generate(prompt, **options))
    bench = LlamaBench(args.new_tokens) if llama_bench_built() else None
    if bench is not None:  # its turns come between the others', so the machine's swings hit all alike
        runs[LLAMA_BENCH_RUN] = bench.run
    worker = LlamaCppPython.start(prompt, args.new_tokens)
    if worker is not None:
        runs[LLAMA_CPP_PYTHON_RUN] = worker.run
    rates = interleaved(runs, args.repeat, tokens=args.new_tokens)
    time.sleep(IDLE_EXIT_S)
    first_token = {"raw model.generate fp32": time_calls(fresh(lambda: raw_generate(1)), args.repeat * 3)}
    first_token["llm.generate, max_new_tokens=1"] = time_calls(lambda: llm.generate(prompt, **greedy(1)),
                                                               args.repeat * 3)
    first_token["llm.generate stream, first text piece (word boundary)"] = Stats(
        [first_piece_seconds(served, prompt) for _ in range(args.repeat * 3)])
    result = {"rates": {k: v.to_dict() for k, v in rates.items()},
              "first_token_s": {k: v.to_dict() for k, v in first_token.items()},
              "new_tokens": args.new_tokens, "prompt_tokens": enc["input_ids"].shape[1],
              "serving": served.describe()["serving"], "machine": machine()}
    if bench is None:
        result["llama_bench_note"] = "native llama.cpp not built: run bash bench/setup_llama_server.sh"
    else:
        result["llama_bench"] = {"command": bench.command_text, "generated": args.new_tokens,
                                 "note": "llama-bench -p 0: generation from an empty context (its own timer, "
                                         "model load and warm-up excluded); ours decode after the "
                                         f"{enc['input_ids'].shape[1]}-token prompt, prefill included"}
    if worker is not None:
        result["llama_cpp_python"] = {"first_token_s": Stats(worker.first_token_s).to_dict(),
                                      "generated": worker.generated}
        worker.close()
    served.close()
    unquantized.close()
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
    """Tokens/s of each run, one of each in turn, so load from other processes hits all alike. A run that
    returns a number reports its own tokens/s (llama-bench times itself, without loading the model)."""
    for call in runs.values():
        call()  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, call in runs.items():
            time.sleep(IDLE_EXIT_S)  # the previous run's serving thread ends: one long-lived torch thread at a time
            start = time.perf_counter()
            own = call()
            elapsed = time.perf_counter() - start
            rates[name].append(own if isinstance(own, float) else tokens / elapsed)
    return {name: Stats(values) for name, values in rates.items()}


AVX2_RUN = "llm.generate, AVX2 kernel (AVX-512 path off)"
LLAMA_BENCH_RUN = "llama.cpp native (llama-bench, same GGUF, -t 2)"


def avx2_kernel():
    """The AVX2 build of our kernel, if this install has it (setup.py builds both where it can)."""
    import importlib

    from llm_module.runtime import int4_kernel

    try:
        return importlib.import_module(int4_kernel.BUILDS[1][0])
    except ImportError:
        return None


def with_kernel(module, call):
    """Run ``call`` with the packed layers on ``module`` (same packed layout), then put the chosen one back."""
    from llm_module.runtime import int4_kernel

    chosen = int4_kernel.kernel()
    int4_kernel._loaded["module"] = module
    try:
        return call()
    finally:
        int4_kernel._loaded["module"] = chosen
LLAMA_CPP_PYTHON_RUN = "llama.cpp via llama-cpp-python (same GGUF)"


class LlamaBench:
    """One ``llama-bench -p 0 -n N -t 2 -r 1`` a turn: llama.cpp's own decode speed on the same GGUF."""

    def __init__(self, new_tokens: int, threads: int | None = None) -> None:
        from llm_module.loader import default_gguf_path

        threads = threads or len(os.sched_getaffinity(0))
        self.command = [str(LLAMA_BENCH), "-m", str(default_gguf_path()), "-p", "0", "-n", str(new_tokens),
                        "-t", str(threads), "-r", "1", "-o", "json"]
        self.command_text = f"llama-bench -p 0 -n {new_tokens} -t {threads} -r 1 (one run a turn)"
        self.env = {**os.environ, "LD_LIBRARY_PATH": f"{LLAMA_BIN}:{os.environ.get('LD_LIBRARY_PATH', '')}"}

    def run(self) -> float:
        proc = subprocess.run(self.command, capture_output=True, text=True, env=self.env, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"llama-bench failed: {proc.stderr[-2000:]}")
        rows = json.loads(proc.stdout)
        return float(rows[0]["avg_ts"])


class LlamaCppPython:
    """llama-cpp-python on the same GGUF in its own process (bench/llama_cpp_worker.py --serve), if built
    by bench/setup_llama_cpp.sh: one run a call."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.first_token_s: list[float] = []
        self.generated = 0

    @classmethod
    def start(cls, prompt: str, new_tokens: int) -> LlamaCppPython | None:
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


# ------------------------------------------------------------------------------------------ threads
THREAD_VARIANTS = {
    "clean": "a clean process: llm.generate from the main thread",
    "foreign work in the caller's thread": "the main thread first ran 20 small torch matmuls, then called "
                                            "llm.generate (its idle OpenMP team is still there)",
    "another long-lived torch thread": "another thread ran a torch nn.Linear stack 20 times and stays alive, "
                                       "idle, while the main thread calls llm.generate",
}


def threads(args) -> dict:
    """Each variant in its own process, variants in turn, ``repeat`` rounds."""
    rates: dict[str, list[float]] = {v: [] for v in THREAD_VARIANTS}
    kernel = None
    for round_index in range(args.repeat):
        for variant in THREAD_VARIANTS:
            cmd = [sys.executable, __file__, "threads-worker", "--variant", variant,
                   "--new-tokens", str(args.new_tokens), "--calls", str(args.calls)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WORKER ")), None)
            if line is None:
                raise RuntimeError(f"threads worker {variant!r} failed:\n{proc.stderr[-3000:]}")
            figures = json.loads(line[7:])
            rates[variant].append(figures["tokens_per_s"])
            kernel = figures["int4_kernel"]
            log(f"threads round {round_index + 1}: {variant}: {figures['tokens_per_s']:.1f} tokens/s")
    return {"threads": {v: Stats(r).to_dict() for v, r in rates.items()}, "variants": THREAD_VARIANTS,
            "int4_kernel": kernel, "new_tokens": args.new_tokens, "calls_per_process": args.calls,
            "machine": machine()}


def threads_worker(args) -> None:
    import torch

    from llm_module import llm

    engine = make_engine(home("threads"))
    use_default_engine(engine)
    prompt = chat_prompt(engine.tokenizer, STORY_REQUEST)
    idle = threading.Event()
    if args.variant == "foreign work in the caller's thread":
        a = torch.randn(256, 256)
        for _ in range(20):
            a = torch.tanh(a @ a)
    elif args.variant == "another long-lived torch thread":
        ready = threading.Event()

        def other_model() -> None:
            stack = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)])
            x = torch.randn(8, 512)
            with torch.inference_mode():
                for _ in range(20):
                    stack(x)
            ready.set()
            idle.wait()  # alive and idle for the rest of the process

        threading.Thread(target=other_model, name="other-torch-model", daemon=True).start()
        ready.wait()
    llm.generate(prompt, **greedy(args.new_tokens))  # warm-up
    rates = []
    for _ in range(args.calls):
        start = time.perf_counter()
        llm.generate(prompt, **greedy(args.new_tokens))
        rates.append(args.new_tokens / (time.perf_counter() - start))
    print("WORKER " + json.dumps({"tokens_per_s": Stats(rates).median,
                                  "int4_kernel": engine.describe()["serving"].get("int4_kernel")}), flush=True)
    idle.set()
    engine.close()


# ----------------------------------------------------------------------------------------- overhead
def overhead(args) -> dict:
    """The action layer's own cost: llm.generate with the runner's forward replaced by an instant stub
    (zero logits, so the first token ends the call); stub alone timed apart."""
    import torch

    from llm_module import llm
    from llm_module.serving import runner as runner_module

    engine = make_engine(home("overhead"))
    use_default_engine(engine)
    vocab = engine.host.model.config.vocab_size

    def instant(self, rows, chunks, slots=None):
        for row, chunk in zip(rows, chunks, strict=True):
            row.cached += len(chunk)
        return torch.zeros(len(rows), vocab)

    runner_module.ModelRunner.forward = instant
    stub = time_calls(lambda: torch.zeros(1, vocab), args.calls, warmup=5)
    paths = {
        "llm.generate (jaseci action)": lambda: llm.generate("Hello there", max_new_tokens=1, do_sample=False),
        "engine.generate": lambda: engine.generate("Hello there", max_new_tokens=1, do_sample=False),
        "engine.generate, chat template": lambda: engine.generate("Hello there", chat=True, max_new_tokens=1,
                                                                  do_sample=False),
    }
    figures = {}
    for label, call in paths.items():
        timed = time_calls(call, args.calls, warmup=5)
        figures[label] = {"call_ms": ms(timed), "stub_ms": ms(stub), "overhead_ms": (timed.median - stub.median) * 1000}
    hop = time_calls(lambda: engine.serving.call(lambda: None), args.calls, warmup=5)
    engine.close()
    return {"overhead": figures, "serving_thread_hop_ms": ms(hop)}


def ms(stats: Stats) -> dict:
    return {k: (v * 1000 if k != "n" else v) for k, v in stats.to_dict().items()}


# -------------------------------------------------------------------------------------- concurrency
def aggregate_rate(engine, callers: int, calls: int, new_tokens: int, adapters: list[str] | None) -> float:
    """Generated tokens/s of ``callers`` threads each making ``calls`` generate calls back to back."""
    def caller(index: int) -> None:
        for i in range(calls):
            adapter = adapters[(index + i) % len(adapters)] if adapters else None
            engine.generate(PROMPTS[(index + i) % len(PROMPTS)], chat=True, adapter=adapter, **greedy(new_tokens))

    threads_ = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    start = time.perf_counter()
    for thread in threads_:
        thread.start()
    for thread in threads_:
        thread.join()
    return callers * calls * new_tokens / (time.perf_counter() - start)


def set_stacking(engine, stack: bool, names: list[str], paths: list[Path]) -> None:
    """Per-row stacked LoRA (the serving core's path) or peft's own forward one adapter at a time (the
    baseline): the runner reads ``can_stack`` when the adapters change, so one adapter is reloaded."""
    from llm_module.runtime import lora_rows
    from llm_module.serving import runner as runner_module

    runner_module.can_stack = lora_rows.can_stack if stack else (lambda model, adapters: False)
    engine.load_adapter(str(paths[0]), names[0], replace=True)


def concurrency(args) -> dict:
    adapter_paths = run_in_fresh_thread(make_adapters, WORKDIR / "adapters", args.adapters)
    names = [f"a{i}" for i in range(len(adapter_paths))]
    levels = [int(c) for c in args.callers.split(",")]
    engines = {16: make_engine(home("batch"), max_batch=max(16, max(levels))), 1: make_engine(home("one"), max_batch=1)}
    for engine in engines.values():
        for name, path in zip(names, adapter_paths, strict=True):
            engine.load_adapter(str(path), name)
    modes = {  # label: (engine, adapters, stacked LoRA)
        "base model, serving core": (16, None, True),
        f"{len(names)} adapters mixed, serving core (stacked per-row LoRA)": (16, names, True),
        f"{len(names)} adapters mixed, serving core with peft's per-adapter forward": (16, names, False),
        "base model, one row at a time (max_batch 1)": (1, None, True),
        f"{len(names)} adapters mixed, one row at a time (max_batch 1)": (1, names, True),
    }
    table: dict[str, dict[str, list[float]]] = {m: {str(n): [] for n in levels} for m in modes}
    for engine in engines.values():
        aggregate_rate(engine, 2, 1, 4, names)  # warm-up, adapters included
        time.sleep(IDLE_EXIT_S)
    for _ in range(args.repeat):  # modes in turn, so the machine's swings hit all alike
        for mode, (size, adapters, stacked) in modes.items():
            engine = engines[size]
            set_stacking(engine, stacked, names, adapter_paths)
            for n in levels:
                table[mode][str(n)].append(aggregate_rate(engine, n, args.calls, args.new_tokens, adapters))
            time.sleep(IDLE_EXIT_S)  # the serving thread ends: one long-lived torch thread at a time
            log(f"{mode}: { {n: round(v[-1], 1) for n, v in table[mode].items()} }")
    set_stacking(engines[16], True, names, adapter_paths)
    for engine in engines.values():
        engine.close()
    return {"concurrency": {k: {n: Stats(v).to_dict() for n, v in row.items()} for k, row in table.items()},
            "new_tokens": args.new_tokens, "calls_per_caller": args.calls, "adapters": len(names),
            "baseline": "the best one-caller figure of this section (any mode)"}


# -------------------------------------------------------------------------------------------- setup
def setup(args) -> dict:
    from llm_module.engine import Engine

    engine = Engine(bench_settings(home("setup")))
    warm = time_calls(engine.setup, args.repeat, warmup=1)
    adapter = run_in_fresh_thread(make_adapters, WORKDIR / "setup-adapters", 1)[0]
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
    engine.close()
    figures = {"warm_setup_s": warm.to_dict(), "adapter_load_s": Stats(load).to_dict(),
               "adapter_unload_s": Stats(unload).to_dict(), "second_adapter_load_unload_s": second.to_dict(),
               "import_s": import_seconds()}
    if not args.skip_cold:
        from llm_module.settings import Settings

        cold = Engine(Settings(home=home("cold"), cache=WORKDIR / "cold-cache"))
        start = time.perf_counter()
        cold.setup()
        figures["cold_setup_s"] = time.perf_counter() - start
        cold.close()
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

    paths = run_in_fresh_thread(make_adapters, WORKDIR / "memory-adapters", args.adapters)
    figures = {}
    for label, adapters in (("no adapters", []), (f"{len(paths)} adapters", paths)):
        flags = [a for i, path in enumerate(adapters) for a in ("--adapter", f"a{i}={path}")]
        with OurServer(WORKDIR / f"memory-{len(adapters)}", *flags) as server:
            names = [f"a{i}" for i in range(len(adapters))] or [None] * 8
            threads_ = [threading.Thread(target=lambda n=n, u=server.url: requests.post(
                f"{u}/v1/generate", json={"prompt": PROMPTS[0], "adapter": n, **greedy(16)}, timeout=600))
                for n in names]
            for thread in threads_:
                thread.start()
            for thread in threads_:
                thread.join()
            figures[label] = server.rss()
    return {"memory_mib": figures}


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
    """Perplexity: each served copy's model (``runtime.prepare`` with that quantize setting) on held-out text;
    greedy agreement: the engine's own generate (the serving core) against fp32 ``model.generate``."""
    import torch

    loaded = run_in_fresh_thread(load_reference_model)
    tokenizer, reference = loaded.tokenizer, loaded.model
    text = (BENCH_DIR / "data" / "heldout.txt").read_text(encoding="utf-8")
    figures = {"fp32": {"perplexity": run_in_fresh_thread(perplexity, reference, tokenizer, text)}}
    prompts = [chat_prompt(tokenizer, p) for p in PROMPTS]

    def reference_texts() -> list[list[int]]:
        """Each prompt alone (no padding), as the served path sees it."""
        texts = []
        with torch.inference_mode():
            for prompt in prompts:
                enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
                out = reference.generate(**enc, **greedy(args.new_tokens), pad_token_id=tokenizer.pad_token_id)
                texts.append(out[0, enc["input_ids"].shape[1]:].tolist())
        return texts

    want = run_in_fresh_thread(reference_texts)
    loaded = reference = None  # free the fp32 copy before the served ones load
    # The served copies: int4 (the default for the GGUF model), int8, int4 with the bf16 prefill copy
    # (perplexity reads 256-token windows: with the copy, through the bf16 weights prompts are read with).
    for name, mode, dense in (("int8", "int8", False), ("int4", "int4", False),
                              ("int4, bf16 prefill copy", "int4", True)):
        engine = make_engine(home(f"quality-{mode}"), quantize=mode, dense_prefill=dense)
        model = engine.host.model
        ppl = engine.serving.call(lambda m=model: perplexity(m, tokenizer, text))
        got = []
        for prompt in prompts:
            call, handle = engine.start(prompt, **greedy(args.new_tokens))
            got.append(handle.result()[0].token_ids)
        same_prefix = [first_difference(a, b) for a, b in zip(got, want, strict=True)]
        figures[name] = {"perplexity": ppl, "identical_greedy_texts": sum(p >= args.new_tokens for p in same_prefix),
                         "mean_identical_tokens": sum(same_prefix) / len(same_prefix),
                         "serving": engine.describe()["serving"]}
        engine.close()
    return {"quality": figures, "new_tokens": args.new_tokens, "texts": len(PROMPTS), "machine": machine()}


def first_difference(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


SECTIONS = {"single": single, "threads": threads, "overhead": overhead, "concurrency": concurrency, "setup": setup,
            "memory": memory, "quality": quality}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=sorted([*SECTIONS, "threads-worker"]))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200,
                        help="overhead: calls; concurrency: calls per caller; threads: timed calls per process")
    parser.add_argument("--callers", default="1,4,8")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--skip-cold", action="store_true")
    parser.add_argument("--variant", choices=list(THREAD_VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.section == "threads-worker":
        threads_worker(args)
        return
    log(f"{args.section} starting (load average {os.getloadavg()[0]:.1f})")
    emit({"section": args.section, **SECTIONS[args.section](args), "load_average_end": os.getloadavg()})


if __name__ == "__main__":
    main()
