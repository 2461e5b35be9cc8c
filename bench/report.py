"""Render bench/results.json figures into bench/README.md: tables, ratios, targets, then bench/findings.md."""

from __future__ import annotations

from pathlib import Path

from common import BENCH_DIR

TARGETS = {
    "single_vs_raw": 1.5, "single_vs_llama": 0.5, "concurrent_8x": 4.0, "adapters_8x": 3.0,
    "overhead_ms": 1.0, "http_overhead_ms": 5.0, "warm_setup_s": 2.0, "adapter_load_s": 0.3,
}


def fmt(stats: dict | None, digits: int = 1, scale: float = 1.0) -> str:
    if not stats:
        return "n/a"
    return (f"{stats['median'] * scale:.{digits}f} ({stats['min'] * scale:.{digits}f}–"
            f"{stats['max'] * scale:.{digits}f})")


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    met = value >= target if higher_is_better else value <= target
    return f"{'meets' if met else 'misses'} target {'≥' if higher_is_better else '≤'} {target:g}"


def write_readme(path: Path, meta: dict, results: dict) -> None:
    lines = [
        "# llm_module bench",
        "",
        "Every figure is a median with (min–max) over repeats, and every ratio is against a baseline measured "
        "in the same run. Regenerate this file with the command below; raw figures are in `bench/results.json`, "
        "each section's log in `bench/.cache/logs/`.",
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
    for section, render in RENDERERS.items():
        if section in results:
            lines += ["", *render(results[section])]
    findings = BENCH_DIR / "findings.md"
    if findings.exists():
        lines += ["", findings.read_text(encoding="utf-8").rstrip()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def header(title: str, result: dict) -> list[str]:
    lines = [f"## {title}", "", f"`{result.get('command', '')}` ({result.get('seconds', '?')} s)", ""]
    for key in ("missing", "failed"):
        if key in result:
            lines += [f"**{key}**:", "", "```", str(result[key])[-1500:], "```", ""]
    return lines


def render_quality(r: dict) -> list[str]:
    lines = header("Quality of the served model (weight-only quantization) vs fp32", r)
    if "quality" not in r:
        return lines
    q = r["quality"]
    base = q["fp32"]["perplexity"]
    lines += ["| weights | held-out perplexity | vs fp32 | greedy texts identical "
              f"({r['new_tokens']} tokens) | mean identical prefix (tokens) |", "|---|---|---|---|---|",
              f"| fp32 (baseline) | {base:.3f} | 1.000× | – | – |"]
    notes = {"int4": " (served default for decoding: int4 body, int8 head)",
             "int4, bf16 prefill copy": " (opt-in, LLM_MODULE_DENSE_PREFILL=1: prompts of 16+ tokens)"}
    for mode in (m for m in q if m != "fp32"):
        m = q[mode]
        lines.append(f"| {mode}{notes.get(mode, '')} | "
                     f"{m['perplexity']:.3f} | {m['perplexity'] / base:.4f}× | "
                     f"{m['identical_greedy_texts']}/{r['texts']} | {m['mean_identical_tokens']:.1f} |")
    return lines


def render_single(r: dict) -> list[str]:
    lines = header(f"1. Single stream, {r.get('new_tokens')} new tokens, greedy "
                   f"(prompt {r.get('prompt_tokens')} tokens)", r)
    if "rates" not in r:
        return lines
    rates = r["rates"]
    raw = rates["raw model.generate fp32"]["median"]
    lines += ["| engine | tokens/s | vs raw model.generate fp32 |", "|---|---|---|"]
    for name, stats in rates.items():
        lines.append(f"| {name} | {fmt(stats)} | {stats['median'] / raw:.2f}× |")
    llama = r.get("llama_cpp")
    if llama:
        turns = ", its runs in turn with the others" if r.get("llama_cpp_interleaved") else ""
        lines.append(f"| llama.cpp (same GGUF, {r.get('llama_cpp_generated')} tokens{turns}) | {fmt(llama)} | "
                     f"{llama['median'] / raw:.2f}× |")
    ours = rates["llm.generate"]["median"]
    lines += ["", f"- llm.generate vs raw model.generate fp32: **{ours / raw:.2f}×** "
                  f"({verdict(ours / raw, TARGETS['single_vs_raw'])})"]
    if llama:
        lines.append(f"- llm.generate vs llama.cpp: **{ours / llama['median']:.2f}×** "
                     f"({verdict(ours / llama['median'], TARGETS['single_vs_llama'])})")
    else:
        lines.append(f"- llama.cpp: {r.get('llama_cpp_note')}")
    lines += ["", "Time to first token (prefill + 1 token), ms:", "", "| path | ms |", "|---|---|"]
    for name, stats in r["first_token_s"].items():
        lines.append(f"| {name} | {fmt(stats, 1, 1000)} |")
    if r.get("llama_cpp_first_token_s"):
        lines.append(f"| llama.cpp | {fmt(r['llama_cpp_first_token_s'], 1, 1000)} |")
    return lines


def render_concurrency(r: dict) -> list[str]:
    lines = header(f"2. Concurrent callers in process ({r.get('new_tokens')} tokens a call, "
                   f"{r.get('calls_per_caller')} calls a caller, window {r.get('window_ms')} ms)", r)
    if "concurrency" not in r:
        return lines
    table = r["concurrency"]
    levels = list(next(iter(table.values())))
    lines += ["Aggregate tokens/s; ratio vs one caller of the same row.", "",
              "| mode | " + " | ".join(f"{n} caller(s)" for n in levels) + " |",
              "|---|" + "---|" * len(levels)]
    for mode, row in table.items():
        one = row[levels[0]]["median"]
        cells = [f"{fmt(row[n])} = {row[n]['median'] / one:.2f}×" for n in levels]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    top = levels[-1]
    stacked, peft = table.get("adapters, batcher on"), table.get("adapters via peft, batcher on")
    if stacked and peft:
        lines.append("\n- mixed adapters, stacked LoRA vs peft's `adapter_names` loop: "
                     + ", ".join(f"{n} caller(s) **{stacked[n]['median'] / peft[n]['median']:.2f}×**" for n in levels))
    for mode, key in (("base, batcher on", "concurrent_8x"), ("adapters, batcher on", "adapters_8x")):
        if mode in table:
            value = table[mode][top]["median"] / table[mode][levels[0]]["median"]
            lines.append(f"\n- {mode}: {top} callers = **{value:.2f}×** one caller ({verdict(value, TARGETS[key])})")
    return lines


def render_overhead(r: dict) -> list[str]:
    lines = header("3. Per-call overhead of the action layer (llm.generate with an instant stub model)", r)
    if "overhead" not in r:
        return lines
    lines += ["| path | call, ms | stub alone, ms | overhead, ms |", "|---|---|---|---|"]
    for mode, f in r["overhead"].items():
        lines.append(f"| llm.generate, {mode} | {fmt(f['call_ms'], 3)} | {fmt(f['stub_ms'], 3)} | "
                     f"**{f['overhead_ms']:.3f}** ({verdict(f['overhead_ms'], TARGETS['overhead_ms'], False)}) |")
    return lines


def render_setup(r: dict) -> list[str]:
    lines = header("4. Setup and adapters", r)
    if "warm_setup_s" not in r:
        return lines
    warm = r["warm_setup_s"]["median"]
    load = r["adapter_load_s"]["median"]
    lines += ["| step | seconds | ratio |", "|---|---|---|",
              f"| import llm_module.llm + torch + transformers + peft (fresh interpreter) | "
              f"{r['import_s']:.2f} | – |"]
    if "cold_setup_s" in r:
        lines.append(f"| cold setup (GGUF → HF cache, temp LLM_MODULE_CACHE) | {r['cold_setup_s']:.2f} | "
                     f"baseline |")
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
    return lines


def render_memory(r: dict) -> list[str]:
    lines = header("6. Peak resident memory of `llm-module serve` (default model, after 8 concurrent calls)", r)
    if "memory_mib" not in r:
        return lines
    rows = list(r["memory_mib"].items())
    base = rows[0][1]["peak_mib"]
    lines += ["| server | peak RSS MiB | vs no adapters |", "|---|---|---|"]
    for label, f in rows:
        lines.append(f"| {label} | {f['peak_mib']:.0f} | {f['peak_mib'] / base:.2f}× |")
    return lines


def render_external(title: str):
    def render(r: dict) -> list[str]:
        lines = header(title, r)
        if r.get("output"):
            lines += ["```", r["output"].strip(), "```"]
        return lines
    return render


RENDERERS = {
    "quality": render_quality,
    "single": render_single,
    "concurrency": render_concurrency,
    "http": render_external("2–3. Over HTTP: overhead and concurrent clients (bench/bench_http.py)"),
    "overhead": render_overhead,
    "setup": render_setup,
    "training": render_external("5. Training: llm.train vs the seed recipe (bench/bench_training.py)"),
    "memory": render_memory,
}
