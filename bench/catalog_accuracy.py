"""Does llm.train teach facts? Train with the defaults on the catalog, then ask the questions.

Trains an adapter on tests/data/catalog_train.json with llm.train's defaults on the
default model (SmolLM2-135M-Instruct), then asks every question of catalog_seen.jsonl
(the training questions) and catalog_test.jsonl (paraphrases) with greedy chat
generation, base model and adapter, and counts an answer right when it contains the
expected fact (case-insensitive). Prints base vs tuned accuracy and the minutes taken.

    python bench/catalog_accuracy.py                       # the documented run
    python bench/catalog_accuracy.py --params '{"EPOCHS": 4}' --limit 20
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
DATA = REPO / "tests" / "data"


def read_questions(path: Path, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="{}", help="training_params JSON overriding the defaults")
    parser.add_argument("--train-file", default=str(DATA / "catalog_train.json"))
    parser.add_argument("--limit", type=int, default=None, help="ask only the first N questions of each set")
    parser.add_argument("--output-dir", default=None, help="where the run goes (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the figures (and every answer) to this file")
    args = parser.parse_args()

    from llm_module.engine import Engine

    engine = Engine(batch_window_s=0.0)
    engine.setup()
    seen = read_questions(DATA / "catalog_seen.jsonl", args.limit)
    paraphrased = read_questions(DATA / "catalog_test.jsonl", args.limit)
    base_seen, _ = accuracy(engine, seen, "base")
    base_test, _ = accuracy(engine, paraphrased, "base")
    output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="catalog-run-")) / "catalog"
    start, cpu_start = time.perf_counter(), time.process_time()
    result = engine.train(args.train_file, str(output_dir), json.loads(args.params), adapter_name="catalog",
                          show_progress=True)
    minutes = (time.perf_counter() - start) / 60
    # CPU time over the torch threads: what the run takes when it has the cores to itself
    # (the wall time grows with whatever else shares the machine).
    threads = __import__("torch").get_num_threads()
    cpu_minutes = (time.process_time() - cpu_start) / 60
    tuned_seen, seen_rows = accuracy(engine, seen, "catalog")
    tuned_test, test_rows = accuracy(engine, paraphrased, "catalog")
    figures = {
        "base_seen": round(base_seen, 3), "base_paraphrased": round(base_test, 3),
        "tuned_seen": round(tuned_seen, 3), "tuned_paraphrased": round(tuned_test, 3),
        "train_minutes": round(minutes, 2), "train_seconds_in_trainer": result["seconds"],
        "train_cpu_minutes": round(cpu_minutes, 2), "unshared_minutes_estimate": round(cpu_minutes / threads, 2),
        "steps": result["steps"], "train_loss": result["train_loss"], "tokens_per_s": result["tokens_per_s"],
        "params": result["params"], "warnings": result["warnings"],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {threads}",
    }
    print(json.dumps(figures, indent=1))
    print(f"\nseen questions:        base {base_seen:.0%}  ->  tuned {tuned_seen:.0%}   ({len(seen)} questions)")
    print(f"paraphrased questions: base {base_test:.0%}  ->  tuned {tuned_test:.0%}   ({len(paraphrased)} questions)")
    print(f"training took {minutes:.1f} min wall (load + train + save), {result['steps']} steps; "
          f"{cpu_minutes:.1f} CPU-min over {threads} threads = ~{cpu_minutes / threads:.1f} min on idle cores")
    print(f"reproduce: python bench/catalog_accuracy.py --params '{args.params}'")
    if args.json:
        Path(args.json).write_text(json.dumps({**figures, "seen": seen_rows, "paraphrased": test_rows}, indent=1))
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
