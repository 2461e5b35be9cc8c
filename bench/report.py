"""Render bench/results.json into bench/README.md (tables, ratios, baselines, targets) and the serving
curves into bench/serving_curves.png (beside the README); bench/findings.md is appended at the end.

    python bench/report.py        # re-render from bench/results.json without running anything
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_DIR  # noqa: E402

PLOT_NAME = "serving_curves.png"  # written beside the README
_plot_dir: list[Path] = [BENCH_DIR]
TARGETS = {
    "single_vs_raw": 1.5, "single_vs_llama": 0.5, "threads": 0.9, "concurrent_8x": 4.0, "adapters_8x": 3.0,
    "overhead_ms": 1.0, "http_overhead_ms": 5.0, "http_8x": 4.0, "warm_setup_s": 2.0, "adapter_load_s": 0.3,
    "streams_8x": 4.0, "first_piece_x": 3.0, "short_under_long_x": 2.0, "sampling_mix_x": 3.5, "vs_llama_server": 1.0,
    "adapters_64_vs_8": 0.9, "openai_extra_ms": 1.0, "training_time_x": 3.0,
}


def fmt(stats: dict | None, digits: int = 1, scale: float = 1.0) -> str:
    if not stats:
        return "n/a"
    if stats.get("n", 2) == 1:
        return f"{stats['median'] * scale:.{digits}f}"
    return (f"{stats['median'] * scale:.{digits}f} ({stats['min'] * scale:.{digits}f}–"
            f"{stats['max'] * scale:.{digits}f})")


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    met = value >= target if higher_is_better else value <= target
    return f"{'meets' if met else 'misses'} target {'≥' if higher_is_better else '≤'} {target:g}"


class Summary:
    """The headline rows: each figure, its baseline, its target."""

    def __init__(self) -> None:
        self.rows: list[str] = []

    def add(self, what: str, value: float, unit: str, baseline: str, key: str | None = None,
            higher_is_better: bool = True, digits: int = 2) -> None:
        target = TARGETS.get(key) if key else None
        result = verdict(value, target, higher_is_better) if target is not None else "–"
        self.rows.append(f"| {what} | **{value:.{digits}f}{unit}** | {baseline} | {result} |")

    def lines(self) -> list[str]:
        if not self.rows:
            return []
        return ["## Summary: every target, its figure and its baseline", "",
                "| figure | value | baseline (same run) | target |", "|---|---|---|---|", *self.rows]


def write_readme(path: Path, meta: dict, results: dict) -> None:
    _plot_dir[0] = path.parent
    summary = Summary()
    body: list[str] = []
    for section, render in RENDERERS.items():
        if section in results:
            try:
                body += ["", *render(results[section], summary)]
            except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:  # figures of another version
                body += ["", *header(section, results[section]),
                         f"(could not render this section's figures: {type(exc).__name__}: {exc})"]
    lines = [
        "# llm_module bench",
        "",
        "Every figure is a median with (min–max) over repeats, and every ratio is against a baseline measured "
        "in the same run, named beside it. Regenerate this file with the command below (or `python bench/report.py` "
        "to re-render `bench/results.json`); each section's log is in `bench/.cache/logs/`.",
        "",
        f"- command: `{meta['command']}` (started {meta['started']})",
        f"- load average before/after: {meta['load_before'][0]:.1f} / {meta['load_after'][0]:.1f} "
        "(2 cores: anything above ~1 means other work shared the CPU and the figures are noisy)",
    ]
    machine = next((r["machine"] for r in results.values() if "machine" in r), None)
    if machine:
        versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
        lines.append(f"- machine: {machine['cpu']}, {machine['cores']} cores, {' '.join(machine['isa'])}, "
                     f"{machine['memory_gib']} GiB; {versions}")
    serving = next((r["serving"] for r in results.values() if r.get("serving")), None)
    kernel = (serving or {}).get("int4_kernel") or next(
        (r["int4_kernel"] for r in results.values() if r.get("int4_kernel")), None)
    if kernel:
        lines.append(f"- int4 kernel in use (`engine.describe()[\"serving\"][\"int4_kernel\"]`): **{kernel}**")
    if serving:
        shown = {k: v for k, v in serving.items() if k != "int4_kernel"}
        lines.append(f"- served model: `{json.dumps(shown)}`")
    lines += ["- baselines: *one at a time* = the same serving core with `--max-batch 1` (one model thread, "
              "requests served one after another): the fair one-caller baseline; an N-caller ratio divides by "
              "the best one-caller figure of its section unless it says otherwise; llama.cpp = its native "
              "binaries (bench/setup_llama_server.sh) on the same GGUF with the same thread count."]
    lines += ["", *summary.lines(), *body]
    findings = BENCH_DIR / "findings.md"
    if findings.exists():
        lines += ["", findings.read_text(encoding="utf-8").rstrip()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def header(title: str, result: dict) -> list[str]:
    lines = [f"## {title}", "", f"`{result.get('command', '')}` ({result.get('seconds', '?')} s, load average at "
             f"the end {fmt_load(result)})", ""]
    for key in ("missing", "failed"):
        if key in result:
            lines += [f"**{key}**:", "", "```", str(result[key])[-1500:], "```", ""]
    return lines


def fmt_load(result: dict) -> str:
    load = result.get("load_average_end")
    return f"{load[0]:.1f}" if load else "?"


# ------------------------------------------------------------------------------------------ sections
def render_quality(r: dict, summary: Summary) -> list[str]:
    lines = header("Quality of the served model (weight-only quantization) vs fp32", r)
    if "quality" not in r:
        return lines
    q = r["quality"]
    base = q["fp32"]["perplexity"]
    lines += ["Perplexity: each served copy's model (`runtime.prepare`) on bench/data/heldout.txt; greedy agreement: "
              "the engine's own generate (the serving core) against fp32 `model.generate`, each prompt alone.", "",
              "| weights | held-out perplexity | vs fp32 | greedy texts identical "
              f"({r['new_tokens']} tokens) | mean identical prefix (tokens) |", "|---|---|---|---|---|",
              f"| fp32 (baseline) | {base:.3f} | 1.000× | – | – |"]
    notes = {"int4": " (served default: int4 body, int8 head)",
             "int4, bf16 prefill copy": " (opt-in, --dense-prefill: prompts of 16+ tokens)"}
    for mode in (m for m in q if m != "fp32"):
        m = q[mode]
        lines.append(f"| {mode}{notes.get(mode, '')} | "
                     f"{m['perplexity']:.3f} | {m['perplexity'] / base:.4f}× | "
                     f"{m['identical_greedy_texts']}/{r['texts']} | {m['mean_identical_tokens']:.1f} |")
    if "int4" in q:
        summary.add("served int4 perplexity vs fp32", q["int4"]["perplexity"] / base, "×", "fp32 model", digits=4)
    return lines


def render_single(r: dict, summary: Summary) -> list[str]:
    lines = header(f"1. Single stream, {r.get('new_tokens')} new tokens, greedy "
                   f"(prompt {r.get('prompt_tokens')} tokens)", r)
    if "rates" not in r:
        return lines
    rates = r["rates"]
    raw = rates["raw model.generate fp32"]["median"]
    lines += ["All runs in one process, one of each in turn each repeat (baselines in short-lived threads).", "",
              "| engine | tokens/s | vs raw model.generate fp32 |", "|---|---|---|"]
    for name, stats in rates.items():
        lines.append(f"| {name} | {fmt(stats)} | {stats['median'] / raw:.2f}× |")
    ours = rates["llm.generate"]["median"]
    summary.add("single stream: llm.generate vs raw model.generate fp32", ours / raw, "×",
                "raw `model.generate`, fp32, same prompt and tokens", "single_vs_raw")
    lines += ["", f"- llm.generate vs raw model.generate fp32: **{ours / raw:.2f}×** "
                  f"({verdict(ours / raw, TARGETS['single_vs_raw'])})"]
    llama = next((v for k, v in rates.items() if k.startswith("llama.cpp native")), None)
    if llama:
        value = ours / llama["median"]
        lines.append(f"- llm.generate vs native llama.cpp (llama-bench): **{value:.2f}×** "
                     f"({verdict(value, TARGETS['single_vs_llama'])}); {r['llama_bench']['note']}")
        summary.add("single stream: llm.generate vs native llama.cpp (llama-bench -n, -t 2)", value, "×",
                    "llama-bench on the same GGUF, its turns between ours", "single_vs_llama")
    else:
        lines.append(f"- native llama.cpp: {r.get('llama_bench_note')}")
    avx2 = next((v for k, v in rates.items() if "AVX2 kernel" in k), None)
    if avx2:
        lines.append(f"- the AVX2 build of our kernel (what a CPU without AVX-512 runs) vs the AVX-512 VNNI one: "
                     f"**{avx2['median'] / ours:.2f}×**; vs raw fp32 **{avx2['median'] / raw:.2f}×**")
    lines += ["", "Time to first token (prefill + 1 token), ms:", "", "| path | ms |", "|---|---|"]
    for name, stats in r["first_token_s"].items():
        lines.append(f"| {name} | {fmt(stats, 1, 1000)} |")
    if r.get("llama_cpp_python"):
        lines.append(f"| llama.cpp via llama-cpp-python | {fmt(r['llama_cpp_python']['first_token_s'], 1, 1000)} |")
    return lines


def render_threads(r: dict, summary: Summary) -> list[str]:
    lines = header(f"1b. Thread robustness: llm.generate, {r.get('new_tokens')} tokens greedy, each variant in its "
                   "own process", r)
    if "threads" not in r:
        return lines
    table = r["threads"]
    clean = table["clean"]["median"]
    lines += [f"Each process: set up, run the variant's foreign torch work, one warm-up call, then "
              f"{r['calls_per_process']} timed calls (their median); the variants' processes in turn, repeated. "
              f"int4 kernel: {r.get('int4_kernel')}.", "",
              "| process | tokens/s | vs clean |", "|---|---|---|"]
    for variant, stats in table.items():
        lines.append(f"| {variant}: {r['variants'][variant]} | {fmt(stats)} | {stats['median'] / clean:.2f}× |")
    for variant, stats in table.items():
        if variant != "clean":
            summary.add(f"thread robustness: {variant}", stats["median"] / clean, "×", "a clean process", "threads")
    return lines


def render_overhead(r: dict, summary: Summary) -> list[str]:
    lines = header("3. Per-call overhead of the action layer (the runner's forward replaced by an instant stub)", r)
    if "overhead" not in r:
        return lines
    lines += ["max_new_tokens=1; the call crosses to the serving thread and back. Baseline: the stub alone.", "",
              "| path | call, ms | stub alone, ms | overhead, ms |", "|---|---|---|---|"]
    for mode, f in r["overhead"].items():
        lines.append(f"| {mode} | {fmt(f['call_ms'], 3)} | {fmt(f['stub_ms'], 3)} | "
                     f"**{f['overhead_ms']:.3f}** ({verdict(f['overhead_ms'], TARGETS['overhead_ms'], False)}) |")
    if r.get("serving_thread_hop_ms"):
        lines.append(f"\n- one hop to the serving thread and back (`serving.call(lambda: None)`): "
                     f"{fmt(r['serving_thread_hop_ms'], 3)} ms")
    first = next(iter(r["overhead"].values()))
    summary.add("action layer overhead per call (llm.generate)", first["overhead_ms"], " ms",
                "the stubbed forward alone", "overhead_ms", higher_is_better=False)
    return lines


def render_concurrency(r: dict, summary: Summary) -> list[str]:
    lines = header(f"2. Concurrent callers in process ({r.get('new_tokens')} tokens a call, "
                   f"{r.get('calls_per_caller')} calls a caller)", r)
    if "concurrency" not in r:
        return lines
    table = r["concurrency"]
    levels = list(next(iter(table.values())))
    best_one = max(row[levels[0]]["median"] for row in table.values())
    lines += [f"Aggregate tokens/s; ratio vs **the best one-caller figure of this section** ({best_one:.1f} "
              "tokens/s, any mode). Modes in turn each repeat; one serving thread alive at a time.", "",
              "| mode | " + " | ".join(f"{n} caller(s)" for n in levels) + " |",
              "|---|" + "---|" * len(levels)]
    for mode, row in table.items():
        cells = [f"{fmt(row[n])} = {row[n]['median'] / best_one:.2f}×" for n in levels]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    top = levels[-1]
    base = next((row for mode, row in table.items() if mode.startswith("base model, serving core")), None)
    mixed = next((row for mode, row in table.items() if "stacked" in mode), None)
    peft = next((row for mode, row in table.items() if "peft" in mode), None)
    one = next((row for mode, row in table.items() if mode.startswith("base model, one row")), None)
    if base:
        value = base[top]["median"] / best_one
        lines.append(f"\n- base model, {top} callers: **{value:.2f}×** the best one caller "
                     f"({verdict(value, TARGETS['concurrent_8x'])})")
        summary.add(f"{top} callers in process, base model", value, "×", "best one-caller figure (in process)",
                    "concurrent_8x")
        if one:
            lines.append(f"- vs one at a time (max_batch 1) with {top} callers: "
                         f"**{base[top]['median'] / one[top]['median']:.2f}×**")
    if mixed:
        value = mixed[top]["median"] / best_one
        lines.append(f"- {r.get('adapters')} different adapters, {top} callers: **{value:.2f}×** the best one caller "
                     f"({verdict(value, TARGETS['adapters_8x'])})")
        summary.add(f"{top} callers in process, {r.get('adapters')} different adapters", value, "×",
                    "best one-caller figure (in process)", "adapters_8x")
        if peft:
            lines.append("- mixed adapters, stacked per-row LoRA vs peft's per-adapter forward: "
                         + ", ".join(f"{n} caller(s) **{mixed[n]['median'] / peft[n]['median']:.2f}×**"
                                     for n in levels))
    return lines


def render_setup(r: dict, summary: Summary) -> list[str]:
    lines = header("4. Setup and adapters", r)
    if "warm_setup_s" not in r:
        return lines
    warm = r["warm_setup_s"]["median"]
    load = r["adapter_load_s"]["median"]
    lines += ["| step | seconds | ratio |", "|---|---|---|",
              f"| import llm_module.llm + torch + transformers + peft (fresh interpreter) | "
              f"{r['import_s']:.2f} | – |"]
    if "cold_setup_s" in r:
        lines.append(f"| cold setup (GGUF → HF cache, empty cache folder) | {r['cold_setup_s']:.2f} | baseline |")
        lines.append(f"| warm setup (cache) | {fmt(r['warm_setup_s'], 3)} | "
                     f"{r['cold_setup_s'] / warm:.1f}× faster than cold; "
                     f"{verdict(warm, TARGETS['warm_setup_s'], False)} |")
    else:
        lines.append(f"| warm setup (cache) | {fmt(r['warm_setup_s'], 3)} | "
                     f"{verdict(warm, TARGETS['warm_setup_s'], False)} |")
    lines += [f"| load a LoRA adapter (first: wraps the model) | {fmt(r['adapter_load_s'], 3)} | "
              f"{verdict(load, TARGETS['adapter_load_s'], False)} |",
              f"| unload it (last: unwraps) | {fmt(r['adapter_unload_s'], 3)} | – |",
              f"| load + unload a second adapter beside a first | {fmt(r['second_adapter_load_unload_s'], 3)} | – |"]
    summary.add("warm setup", warm, " s", "cold setup" + (f" {r['cold_setup_s']:.1f} s" if "cold_setup_s" in r
                                                          else " (skipped)"), "warm_setup_s", False)
    summary.add("adapter load", load, " s", "–", "adapter_load_s", False)
    return lines


def render_memory(r: dict, summary: Summary) -> list[str]:
    lines = header("6. Peak resident memory of `llm-module serve` (default model, after 8 concurrent calls)", r)
    if "memory_mib" not in r:
        return lines
    rows = list(r["memory_mib"].items())
    base = rows[0][1]["peak_mib"]
    lines += ["| server | peak RSS MiB | RSS now MiB | vs no adapters |", "|---|---|---|---|"]
    for label, f in rows:
        lines.append(f"| {label} | {f['peak_mib']:.0f} | {f['now_mib']:.0f} | {f['peak_mib'] / base:.2f}× |")
    return lines


def render_http(r: dict, summary: Summary) -> list[str]:
    lines = header("2–3. Over HTTP: overhead and concurrent clients (bench/bench_http.py)", r)
    if "overhead" not in r:
        return lines + (["```", r["output"].strip(), "```"] if r.get("output") else [])
    lines += ["Per-call overhead, ms: the same call in process (an engine in the bench's process) and over "
              "loopback HTTP to `llm-module serve`.", "",
              "| call | in process | HTTP | overhead |", "|---|---|---|---|"]
    for label, f in r["overhead"].items():
        lines.append(f"| {label} | {fmt(f['in_process_ms'], 2)} | {fmt(f['http_ms'], 2)} | "
                     f"**{f['overhead_ms']:.2f}** |")
    first = r["overhead"].get("model_info")
    if first:
        summary.add("HTTP overhead per call (model_info)", first["overhead_ms"], " ms", "the same call in process",
                    "http_overhead_ms", False)
    table = r["throughput"]
    levels = list(next(iter(table.values())))
    best_one = max(row[levels[0]]["median"] for row in table.values())
    lines += ["", f"Aggregate tokens/s, {r['new_tokens']} tokens a call, {r['requests_per_client']} calls a client; "
              f"ratio vs the best one-client figure of the run ({best_one:.1f}).", "",
              "| server | " + " | ".join(f"{n} client(s)" for n in levels) + " |", "|---|" + "---|" * len(levels)]
    for label, row in table.items():
        lines.append(f"| {r['servers'][label]} | " + " | ".join(
            f"{fmt(row[n])} = {row[n]['median'] / best_one:.2f}×" for n in levels) + " |")
    ours = table.get("serving core (--max-batch 16)")
    one = table.get("one at a time (--max-batch 1)")
    if ours:
        top = levels[-1]
        value = ours[top]["median"] / best_one
        lines.append(f"\n- {top} HTTP clients: **{value:.2f}×** the best one client "
                     f"({verdict(value, TARGETS['http_8x'])})")
        if one:
            lines.append(f"- vs one at a time (--max-batch 1) with {top} clients: "
                         f"**{ours[top]['median'] / one[top]['median']:.2f}×**")
        summary.add(f"{top} HTTP clients (/v1/generate)", value, "×", "best one-client figure (either server)",
                    "http_8x")
    return lines


def render_streams(r: dict, summary: Summary) -> list[str]:
    lines = header(f"7. Serving core over HTTP: streams, first pieces, short-under-long, sampling mix "
                   f"({r.get('new_tokens')} tokens a stream)", r)
    if "one_stream" not in r:
        return lines
    one, many = r["one_stream"], r["many_streams"]
    n = r["streams"]
    lines += ["Servers, up together, load sent to one at a time, in turn each repeat (on one server a lone stream, "
              "then the 8 streams, each after a 0.5 s pause):", ""]
    lines += [f"- **{kind}**: {text}" for kind, text in r["servers"].items()]
    if r.get("llama_note"):
        lines.append(f"- llama-server: {r['llama_note']}")
    best_one = max(v["tokens_per_s"]["median"] for k, v in one.items() if k != "llama-server")
    lines += ["", f"Same rendered chat prompts, same token counts (ours min_new_tokens, llama.cpp ignore_eos). "
              f"Ratios vs the best one-stream figure of our two servers ({best_one:.1f} tokens/s). A first piece is "
              "the first SSE event with text (both servers send a token's text as soon as it is complete).", "",
              f"| server | 1 stream, tokens/s | first piece, ms | {n} streams, aggregate tokens/s | × best one stream "
              f"| worst first piece of {n}, ms | median first piece, ms |", "|---|---|---|---|---|---|---|"]
    for kind in one:
        lines.append(f"| {kind} | {fmt(one[kind]['tokens_per_s'])} | {fmt(one[kind]['first_s'], 0, 1000)} | "
                     f"{fmt(many[kind]['tokens_per_s'])} | {many[kind]['tokens_per_s']['median'] / best_one:.2f}× | "
                     f"{fmt(many[kind]['worst_first_s'], 0, 1000)} | {fmt(many[kind]['median_first_s'], 0, 1000)} |")
    ours = many["ours"]["tokens_per_s"]["median"]
    value = ours / best_one
    lines.append(f"\n- {n} streams: **{value:.2f}×** the best one stream ({verdict(value, TARGETS['streams_8x'])}); "
                 f"**{ours / many['ours --max-batch 1']['tokens_per_s']['median']:.2f}×** one at a time "
                 f"(--max-batch 1) with {n} streams")
    summary.add(f"{n} concurrent streams (/v1/generate/stream)", value, "×",
                "best one-stream figure (ours, or --max-batch 1)", "streams_8x")
    first = many["ours"]["worst_first_s"]["median"] / one["ours"]["first_s"]["median"]
    lines.append(f"- worst time to first piece among {n} streams vs a lone stream's: **{first:.2f}×** "
                 f"({verdict(first, TARGETS['first_piece_x'], False)})")
    summary.add(f"worst first piece of {n} streams", first, "×", "a lone stream's first piece", "first_piece_x", False)
    if "llama-server" in many:
        vs = ours / many["llama-server"]["tokens_per_s"]["median"]
        single = one["ours"]["tokens_per_s"]["median"] / one["llama-server"]["tokens_per_s"]["median"]
        lines.append(f"- vs native llama-server -np {n}: {n} streams **{vs:.2f}×** "
                     f"({verdict(vs, TARGETS['vs_llama_server'])}); one stream over HTTP **{single:.2f}×**")
        summary.add(f"{n} streams: ours vs native llama-server -np 8", vs, "×",
                    "llama-server, same GGUF, same prompts and tokens, -t 2", "vs_llama_server")
        summary.add("one stream over HTTP: ours vs native llama-server", single, "×", "llama-server, same run")
    short = r["short_under_long"]
    lines += ["", f"A {r['short_tokens']}-token request sent while a {r['long_tokens']}-token stream decodes, vs the "
              "same request alone (seconds):", "", "| server | alone | under the long stream | ratio |",
              "|---|---|---|---|"]
    for kind, f in short.items():
        lines.append(f"| {kind} | {fmt(f['alone_s'], 3)} | {fmt(f['under_long_s'], 3)} | "
                     f"{f['under_long_s']['median'] / f['alone_s']['median']:.2f}× |")
    value = short["ours"]["under_long_s"]["median"] / short["ours"]["alone_s"]["median"]
    summary.add(f"{r['short_tokens']}-token request under a {r['long_tokens']}-token one", value, "×",
                "the same request alone", "short_under_long_x", False)
    mix = r["sampling_mix"]
    one_mix, eight_mix = mix["one_caller_tokens_per_s"]["median"], mix["eight_callers_tokens_per_s"]["median"]
    lines += ["", f"8 callers with 8 different sampling settings (temperature, top_p, top_k, min_p, repetition and "
              f"presence/frequency penalties, n-gram ban, greedy; seeded) at once: "
              f"{fmt(mix['eight_callers_tokens_per_s'])} tokens/s vs one caller sending the same 8 requests one "
              f"after another: "
              f"{fmt(mix['one_caller_tokens_per_s'])} = **{eight_mix / one_mix:.2f}×** "
              f"({verdict(eight_mix / one_mix, TARGETS['sampling_mix_x'])}); vs the best one-stream figure "
              f"{eight_mix / best_one:.2f}×."]
    summary.add("8 callers, 8 different sampling settings", eight_mix / one_mix, "×",
                "one caller, the same 8 requests in turn", "sampling_mix_x")
    return lines


def render_curves(r: dict, summary: Summary) -> list[str]:
    lines = header(f"8. Curves: tokens/s and latency against clients and loaded adapters ({r.get('new_tokens')} "
                   "tokens a request)", r)
    if "clients" not in r:
        return lines
    lines += [f"Server: `{r['server']}`; each client sends {r['requests_per_client']} /v1/generate requests back "
              "to back; latency percentiles over every request of every repeat.", "",
              f"![serving curves]({PLOT_NAME})", "",
              "| clients | aggregate tokens/s | × 1 client | p50 latency, s | p99 latency, s |",
              "|---|---|---|---|---|"]
    clients = r["clients"]
    one = clients[next(iter(clients))]["tokens_per_s"]["median"]
    for c, f in clients.items():
        lines.append(f"| {c} | {fmt(f['tokens_per_s'])} | {f['tokens_per_s']['median'] / one:.2f}× | "
                     f"{f['p50_s']:.3f} | {f['p99_s']:.3f} |")
    adapters = r["adapters"]
    lines += ["", f"{r['in_use']} clients, adapters loaded ({r['adapter_kind']}); {r['in_use']} in use (with 1 "
              "loaded all use it; 0: the base model, nothing loaded):", "",
              "| adapters loaded | aggregate tokens/s | p50 latency, s | p99 latency, s |", "|---|---|---|---|"]
    for a, f in adapters.items():
        lines.append(f"| {a} | {fmt(f['tokens_per_s'])} | {f['p50_s']:.3f} | {f['p99_s']:.3f} |")
    if "64" in adapters and "8" in adapters:
        value = adapters["64"]["tokens_per_s"]["median"] / adapters["8"]["tokens_per_s"]["median"]
        lines.append(f"\n- 64 loaded, 8 in use vs 8 loaded: **{value:.2f}×** "
                     f"({verdict(value, TARGETS['adapters_64_vs_8'])})")
        summary.add("64 adapters loaded (8 in use) vs 8 loaded", value, "×", "8 loaded, 8 clients", "adapters_64_vs_8")
    plot_curves(r)
    return lines


def plot_curves(r: dict) -> None:
    """serving_curves.png beside the README: tokens/s and p50/p99 against clients, and against loaded adapters."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    clients = r["clients"]
    xs = [int(c) for c in clients]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    ax1.plot(xs, [clients[c]["tokens_per_s"]["median"] for c in clients], "o-", label="aggregate tokens/s")
    ax1.fill_between(xs, [clients[c]["tokens_per_s"]["min"] for c in clients],
                     [clients[c]["tokens_per_s"]["max"] for c in clients], alpha=0.2)
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(xs, [str(x) for x in xs])
    ax1.set_xlabel("concurrent clients")
    ax1.set_ylabel("tokens/s")
    ax1.set_title("Aggregate tokens/s")
    ax1.grid(alpha=0.3)
    ax2.plot(xs, [clients[c]["p50_s"] for c in clients], "o-", label="p50")
    ax2.plot(xs, [clients[c]["p99_s"] for c in clients], "s--", label="p99")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(xs, [str(x) for x in xs])
    ax2.set_xlabel("concurrent clients")
    ax2.set_ylabel("request latency, s")
    ax2.set_title(f"Latency ({r['new_tokens']} tokens a request)")
    ax2.legend()
    ax2.grid(alpha=0.3)
    adapters = r["adapters"]
    labels = [f"{a} loaded" if a != "0" else "base" for a in adapters]
    values = [adapters[a]["tokens_per_s"]["median"] for a in adapters]
    bars = ax3.bar(labels, values, color="tab:green")
    for bar, a in zip(bars, adapters, strict=True):
        ax3.annotate(f"p50 {adapters[a]['p50_s']:.2f}s\np99 {adapters[a]['p99_s']:.2f}s",
                     (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax3.set_ylabel("tokens/s")
    ax3.set_title(f"{r['in_use']} clients, {r['in_use']} adapters in use")
    ax3.margins(y=0.25)
    fig.suptitle("llm-module serve, default model (SmolLM2-135M int4, CPU)")
    fig.tight_layout()
    fig.savefig(_plot_dir[0] / PLOT_NAME, dpi=110)
    plt.close(fig)


def render_openai(r: dict, summary: Summary) -> list[str]:
    lines = header("9. OpenAI API: the routes' own cost, and structured output's cost per token", r)
    if "overhead" not in r:
        return lines
    lines += [f"Same 1-token greedy request, {r['calls']} calls each, the two routes call by call in turn, ms:", "",
              "| pair | plain /v1/generate | OpenAI route | extra |", "|---|---|---|---|"]
    for label, f in r["overhead"].items():
        lines.append(f"| {label} | {fmt(f['plain_ms'], 2)} | {fmt(f['openai_ms'], 2)} | **{f['extra_ms']:+.2f}** "
                     f"({verdict(f['extra_ms'], TARGETS['openai_extra_ms'], False)}) |")
        summary.add(f"OpenAI route extra cost: {label}", f["extra_ms"], " ms", "the same request on /v1/generate",
                    "openai_extra_ms", False)
    s = r["structured"]
    free, constrained = s.get("unconstrained"), s.get("response_format json_schema")
    lines += ["", f"Structured output: chat completions, streamed, temperature 0, max_tokens {r['max_tokens']}, "
              f"\"{r['schema_prompt']}\"; decode tokens/s from each stream's first to its last piece. Valid JSON: "
              f"{r['constrained_valid_json']}.", "",
              "| request | decode tokens/s | tokens |", "|---|---|---|"]
    for label, f in s.items():
        lines.append(f"| {label} | {fmt(f['decode_tokens_per_s'])} | {fmt(f['tokens'], 0)} |")
    if free and constrained and free["decode_tokens_per_s"] and constrained["decode_tokens_per_s"]:
        a, b = free["decode_tokens_per_s"]["median"], constrained["decode_tokens_per_s"]["median"]
        lines.append(f"\n- json_schema vs unconstrained: **{b / a:.2f}×** the tokens/s, "
                     f"**{(1 / b - 1 / a) * 1000:+.2f} ms** a token")
        summary.add("structured output (json_schema) decode speed", b / a, "×", "the same request unconstrained")
    return lines


def render_training(r: dict, summary: Summary) -> list[str]:
    lines = header("5. Training: llm.train vs the seed recipe (bench/bench_training.py)", r)
    if "ours" not in r:
        return lines + (["```", r["output"].strip(), "```"] if r.get("output") else [])
    ours, seed, p = r["ours"], r["seed"], r["params"]
    lines += [f"Same {r['records']} records, {p['EPOCHS']:g} epoch(s), LoRA r={p['LORA_R']} alpha={p['LORA_ALPHA']} on "
              f"all linear layers, lr {p['LEARNING_RATE']}, cosine, warm-up {p['WARMUP_STEPS']}, batch "
              f"{p['BATCH_SIZE']}, seed 42; each recipe in its own process. Time: `Trainer.train` alone, the same "
              f"timer for both. Loss: {r['heldout_records']} held-out records, the same response token ids for both "
              "(each model prompted in its own training format); the end token apart (the seed recipe never "
              "trains it).", "",
              "| | llm.train | seed recipe (baseline) | ratio |", "|---|---|---|---|",
              f"| optimizer steps | {ours['steps']} | {seed['steps']} | – |",
              f"| Trainer.train seconds | {ours['train_seconds']:.1f} | {seed['train_seconds']:.1f} | "
              f"**{r['time_ratio_seed_over_ours']:.2f}×** faster |",
              f"| real (non-padding) tokens trained / s | {ours['tokens_per_s']:.0f} ({ours['real_tokens']} tokens) | "
              f"{seed['tokens_per_s']:.0f} ({seed['real_tokens']} tokens) | {r['tokens_per_s_ratio']:.2f}× |",
              f"| examples / s | {ours['examples_per_s']:.2f} | {seed['examples_per_s']:.2f} | "
              f"{ours['examples_per_s'] / seed['examples_per_s']:.2f}× |",
              f"| held-out response loss (same tokens) | {ours['heldout']['response_loss']:.3f} | "
              f"{seed['heldout']['response_loss']:.3f} | {r['heldout_response_loss_ours_minus_seed']:+.3f} |",
              f"| same, untrained base model in that prompt format | {ours['base_model']['response_loss']:.3f} | "
              f"{seed['base_model']['response_loss']:.3f} | – |",
              f"| held-out end-token loss | {ours['heldout']['end_token_loss']:.3f} | "
              f"{seed['heldout']['end_token_loss']:.3f} (never trained) | – |",
              f"| peak memory MB | {ours['peak_memory_mb']:.0f} | {seed['peak_memory_mb']:.0f} | "
              f"{r['peak_memory_ratio']:.2f}× |"]
    summary.add("training: same examples and steps, Trainer.train time", r["time_ratio_seed_over_ours"], "× faster",
                "the seed recipe, same data, LoRA settings and steps", "training_time_x")
    summary.add("training: held-out response loss, ours minus seed", r["heldout_response_loss_ours_minus_seed"], "",
                "the seed recipe (lower is better)")
    return lines


def render_load(r: dict, summary: Summary) -> list[str]:
    lines = header("10. Load test (bench/load_test.py)", r)
    if "rules" not in r:
        return lines
    lines += [f"{r['requests']} generate requests from {r['clients']} clients over the jaseci protocol, adapters "
              f"{', '.join(r['adapters'])} mixed, a background training job started at request "
              f"{r.get('train_at')}; p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
              f"{r['requests_per_s']} requests/s; own-reference answers {r['own_reference_match']}, "
              f"drifted {r['drifted']} (not failures, see the rule).", "",
              "| rule | figure | verdict |", "|---|---|---|"]
    for name, rule in r["rules"].items():
        lines.append(f"| {name} | {rule['figure']} | {'PASS' if rule['pass'] else '**FAIL**'} |")
    lines += ["", f"RSS MiB: after warm-up ({r['warmup_requests']} requests) {r['rss_after_warmup_mb']}, after the "
              f"last request {r['rss_requests_end_mb']}, at the end (job ended) {r['rss_end_mb']}, highest sampled "
              f"{r['rss_peak_sampled_mb']}. **Verdict: {r['verdict']}**"]
    if r.get("first_failure"):
        lines.append(f"\nFirst failure: `{r['first_failure']}`")
    for example in r.get("drift_examples") or []:
        lines.append(f"\n- drifted: {example['adapter']} on {example['prompt']!r}: reference "
                     f"{example['reference']!r}, answered {example['answer']!r}")
    summary.rows.append(f"| load test ({r['requests']} requests) | **{r['verdict']}** | its rules, each with its "
                        f"figure (section 10) | all rules |")
    return lines


def render_chaos(r: dict, summary: Summary) -> list[str]:
    lines = header("11. Chaos soak (bench/chaos_soak.py)", r)
    if "invariants" not in r:
        return lines
    lines += [f"{r.get('asked_seconds', r['seconds'])} s of clients ({r['seconds']} s in all: the admin's op under way "
              f"at the end is let finish), {r['clients']} clients (plain and OpenAI API, streamed or not, random "
              f"adapters {', '.join(r['adapters'])} and options) while an admin loops {r['admin']['cycles']} "
              f"time(s) through {', '.join(f'{k} ×{v}' for k, v in r['admin']['ops'].items())}.", "",
              f"- requests {r['requests']}: answered {r['answered']}, refused with a clear 4xx {r['refused_4xx']} "
              f"({r['refused_by_status']}), 5xx {r['server_errors_5xx']}, lost {r['lost']}; p50 {r['p50_s']} s, "
              f"p99 {r['p99_s']} s, max {r['max_s']} s",
              f"- greedy answers checked {r['greedy_checked']}: own {r['own_answer']}, mixed up {r['mixed_up']}, "
              f"drifted {r['drifted']} (by route: {r.get('drifted_by_route')})",
              f"- memory MiB: after warm-up ({r['memory']['warm_after_s']} s) {r['memory']['rss_warm_mib']}, end "
              f"{r['memory']['rss_end_mib']}, highest sampled {r['memory']['rss_max_sampled_mib']}", "",
              "| invariant | figure | verdict |", "|---|---|---|"]
    for name, rule in r["invariants"].items():
        lines.append(f"| {name} | {rule['figure']} | {'PASS' if rule['pass'] else '**FAIL**'} |")
    for example in r.get("drift_examples") or []:
        lines.append(f"- drifted ({example['route']}): {example['adapter']} on {example['prompt']!r}: reference "
                     f"{example['reference']!r}, answered {example['answer']!r}")
    for key in ("errors", "mismatches"):
        if r["admin"].get(key):
            lines += ["", f"Admin {key}:", "", *[f"- `{e}`" for e in r["admin"][key]]]
    summary.rows.append(f"| chaos soak ({r['seconds']} s) | **{'OK' if r['ok'] else 'NOT OK'}** | its invariants "
                        "(section 11) | all invariants |")
    return lines


RENDERERS = {
    "quality": render_quality,
    "single": render_single,
    "threads": render_threads,
    "concurrency": render_concurrency,
    "http": render_http,
    "overhead": render_overhead,
    "setup": render_setup,
    "training": render_training,
    "memory": render_memory,
    "streams": render_streams,
    "curves": render_curves,
    "openai": render_openai,
    "load": render_load,
    "chaos": render_chaos,
}


def main() -> None:
    data = json.loads((BENCH_DIR / "results.json").read_text())
    write_readme(BENCH_DIR / "README.md", data["meta"], data["results"])
    print(f"wrote {BENCH_DIR / 'README.md'}")


if __name__ == "__main__":
    main()
