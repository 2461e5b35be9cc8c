"""Does llm.train teach facts, on catalogs its defaults were not tuned on, and what does it cost?

For every catalog and every seed: train an adapter with llm.train's defaults on the default
model (SmolLM2-135M-Instruct), then ask every training question (``seen``) and every
paraphrase with greedy chat generation on the served model, counting an answer right when it
contains the expected fact (case-insensitive). Also reported: the share of general questions
the adapter still answers right (``general_retained``, measured by llm.train itself:
llm_module/training/general.py) and the minutes the train call took.

Catalogs: ``public`` (tests/data/catalog_*: the one the defaults were tuned on) and those
bench/make_catalogs.py writes into bench/data/catalogs/ (``rail``, ``courses``).

    python bench/catalog_accuracy.py --json catalog_figures.json          # every catalog, 3 seeds
    python bench/catalog_accuracy.py --catalogs rail --seeds 42 --limit 20  # a quick look
    python bench/catalog_accuracy.py --params '{"EPOCHS": 4}' --options '{"check_forgetting": false}'

Targets (issue 22), on each catalog, for the worst seed: seen >= 98 %, paraphrases >= 85 %,
general retained >= 90 %, train minutes <= 5 on the reference 2-core CPU. Wall minutes grow with
whatever else runs on the machine: the load average before and after each run is printed, and
CPU-minutes / threads estimates the run on idle cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS_DATA = REPO / "tests" / "data"
CATALOGS_DIR = REPO / "bench" / "data" / "catalogs"
TARGETS = {"seen": 0.98, "paraphrased": 0.85, "general_retained": 0.90, "minutes": 5.0}


def catalog_files(name: str) -> dict[str, Path]:
    if name == "public":
        return {"train": TESTS_DATA / "catalog_train.json", "seen": TESTS_DATA / "catalog_seen.jsonl",
                "paraphrased": TESTS_DATA / "catalog_test.jsonl"}
    folder = CATALOGS_DIR / name
    files = {"train": folder / "train.json", "seen": folder / "seen.jsonl", "paraphrased": folder / "paraphrase.jsonl"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"catalog {name!r} is missing {missing}; run python bench/make_catalogs.py")
    return files


def all_catalogs() -> list[str]:
    found = sorted(p.name for p in CATALOGS_DIR.iterdir() if (p / "train.json").is_file()) if CATALOGS_DIR.is_dir() \
        else []
    return ["public", *found]


def read_questions(path: Path, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def accuracy(engine, questions: list[dict], adapter: str) -> tuple[float, list[dict]]:
    """Share of questions whose greedy chat answer contains the expected fact."""
    prompts = [q["question"] for q in questions]
    answers = engine.generate(prompts, chat=True, adapter=adapter, max_new_tokens=32, do_sample=False)
    rows = []
    for q, answer in zip(questions, answers, strict=True):
        text = answer[0]["generated_text"]
        rows.append({"question": q["question"], "expected": q["expected"], "answer": text,
                     "right": q["expected"].lower() in text.lower()})
    return sum(r["right"] for r in rows) / len(rows), rows


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def run_one(engine, name: str, files: dict, questions: dict, seed: int, params: dict, options: dict,
            root: Path) -> dict:
    import torch

    adapter = f"{name}-s{seed}"
    load_before = loadavg()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = engine.train(str(files["train"]), str(root / adapter), params, adapter_name=adapter, seed=seed,
                          show_progress=False, **options)
    minutes = (time.perf_counter() - start) / 60
    threads = torch.get_num_threads()
    cpu_minutes = (time.process_time() - cpu_start) / 60
    load_after = loadavg()
    seen, seen_rows = accuracy(engine, questions["seen"], adapter)
    paraphrased, para_rows = accuracy(engine, questions["paraphrased"], adapter)
    engine.unload_adapter(adapter)
    general = result.get("general") or {}
    return {
        "catalog": name, "seed": seed, "seen": round(seen, 4), "paraphrased": round(paraphrased, 4),
        "general_retained": result.get("general_retained"), "general_base_right": general.get("base_right"),
        "general_adapter_right": general.get("adapter_right"), "general_seconds": general.get("seconds"),
        "general_lost": general.get("lost"),
        "minutes": round(minutes, 2), "cpu_minutes": round(cpu_minutes, 2),
        "unshared_minutes_estimate": round(cpu_minutes / threads, 2), "threads": threads,
        "loadavg_before": load_before, "loadavg_after": load_after,
        "steps": result["steps"], "epochs": result["epochs"], "train_loss": result["train_loss"],
        "eval_loss": result.get("eval_loss"), "tokens_per_s": result["tokens_per_s"],
        "trainer_seconds": result["seconds"], "params": result["params"], "warnings": result["warnings"],
        "answers": {"seen": seen_rows, "paraphrased": para_rows},
    }


def summarize(runs: list[dict]) -> dict:
    """Worst and mean per catalog, and whether the worst seed meets every target."""
    table = {}
    for name in dict.fromkeys(r["catalog"] for r in runs):
        mine = [r for r in runs if r["catalog"] == name]
        row = {}
        for key in ("seen", "paraphrased", "general_retained", "minutes", "unshared_minutes_estimate"):
            values = [r[key] for r in mine if r[key] is not None]
            if not values:
                row[key] = None
                continue
            worst = max(values) if "minutes" in key else min(values)
            row[key] = {"worst": worst, "mean": round(sum(values) / len(values), 4), "all": values}
        row["meets_targets"] = all(
            row[key] is not None and (row[key]["worst"] <= target if key == "minutes" else row[key]["worst"] >= target)
            for key, target in TARGETS.items())
        table[name] = row
    return table


def print_table(table: dict, base: dict, seeds: list[int]) -> None:
    print(f"\n{'catalog':10} {'seen':>14} {'paraphrased':>14} {'general kept':>14} {'minutes':>14}   "
          f"(worst / mean over {len(seeds)} seed(s); base model seen/paraphrased in brackets)")
    for name, row in table.items():
        cells = []
        for key in ("seen", "paraphrased", "general_retained"):
            cell = row[key]
            cells.append(f"{cell['worst']:.0%} / {cell['mean']:.0%}" if cell else "-")
        minutes = row["minutes"]
        cells.append(f"{minutes['worst']:.1f} / {minutes['mean']:.1f}" if minutes else "-")
        b = base.get(name, {})
        print(f"{name:10} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14} {cells[3]:>14}   "
              f"[base {b.get('seen', 0):.0%}/{b.get('paraphrased', 0):.0%}]"
              f"{'  meets targets' if row['meets_targets'] else ''}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalogs", default="all", help="comma-separated names (public, rail, courses) or 'all'")
    parser.add_argument("--seeds", default="42,43,44", help="comma-separated training seeds")
    parser.add_argument("--params", default="{}", help="training_params JSON overriding the defaults")
    parser.add_argument("--options", default="{}", help="more llm.train options as JSON (e.g. lora_config_kwargs)")
    parser.add_argument("--limit", type=int, default=None, help="ask only the first N questions of each set")
    parser.add_argument("--output-dir", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the figures (and every answer) to this file")
    parser.add_argument("--no-base", action="store_true", help="skip asking the base model")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core). On a machine "
                        "shared with other work, 1 thread avoids OpenMP's waits for a descheduled partner thread; "
                        "the accuracy figures do not depend on it, the minutes do")
    args = parser.parse_args()

    from llm_module import Engine, Settings
    from llm_module.engine.state import StateFile

    names = all_catalogs() if args.catalogs == "all" else [n.strip() for n in args.catalogs.split(",") if n.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    params, options = json.loads(args.params), json.loads(args.options)
    root = Path(args.output_dir or tempfile.mkdtemp(prefix="catalog-runs-"))
    root.mkdir(parents=True, exist_ok=True)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = Settings(torch_threads=args.threads)
    engine = Engine(settings, state_file=StateFile(root / "state.json"))  # the user's remembered setup is untouched
    engine.setup()
    runs, base = [], {}
    for name in names:
        files = catalog_files(name)
        questions = {k: read_questions(files[k], args.limit) for k in ("seen", "paraphrased")}
        if not args.no_base:
            base[name] = {k: round(accuracy(engine, questions[k], "base")[0], 4) for k in questions}
        for seed in seeds:
            run = run_one(engine, name, files, questions, seed, params, options, root)
            runs.append(run)
            print(f"{name} seed {seed}: seen {run['seen']:.0%}, paraphrased {run['paraphrased']:.0%}, general "
                  f"retained {run['general_retained']}, {run['minutes']:.2f} min wall "
                  f"(~{run['unshared_minutes_estimate']:.2f} on idle cores; load {run['loadavg_before']:.1f} -> "
                  f"{run['loadavg_after']:.1f}), {run['steps']} steps, loss {run['train_loss']}", flush=True)
    table = summarize(runs)
    print_table(table, base, seeds)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"\nmachine: {machine}; reproduce: python bench/catalog_accuracy.py --catalogs {','.join(names)} "
          f"--seeds {args.seeds} --params '{args.params}' --options '{args.options}'")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "targets": TARGETS, "params": params,
                                               "options": options, "base": base, "summary": table, "runs": runs},
                                              indent=1, ensure_ascii=False))
    engine.close()
    return 0 if all(row["meets_targets"] for row in table.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
