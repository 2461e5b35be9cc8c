"""llm.train on 1 process (in-process) against N processes (torchrun, DDP), same data, recipe and steps.

Both runs share the global batch (MICRO_BATCH_SIZE is split among the processes), so they do
the same optimizer steps on the same examples; only the way the work is spread differs.
Figures: wall time of the llm.train call (start-up and model loading included), training
tokens/s as the Trainer measures them (the training loop alone), final loss, peak RSS.

    python bench/bench_distributed.py                        # bundled model, 1 vs 2 processes
    python bench/bench_distributed.py --model PATH --processes 1,2,4 --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
DATA = REPO / "tests" / "data" / "catalog_train.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="base model (default: the bundled SmolLM2-135M)")
    parser.add_argument("--processes", default="1,2", help="process counts to compare, comma-separated")
    parser.add_argument("--records", type=int, default=64, help="training records from tests/data/catalog_train.json")
    parser.add_argument("--micro-batch", type=int, default=8, help="global micro-batch (split among processes)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the in-process (1-process) run (default: one per core)")
    return parser.parse_args()


def run(engine, data: Path, out: Path, processes: int, args: argparse.Namespace) -> dict:
    import torch

    params = {"MICRO_BATCH_SIZE": args.micro_batch, "BATCH_SIZE": args.micro_batch, "EPOCHS": 1,
              "LEARNING_RATE": 1e-3, "LORA_R": 16, "LORA_ALPHA": 32}
    options = {"training_args_kwargs": {"max_steps": args.steps, "save_strategy": "no"}, "show_progress": False}
    if processes > 1:
        options["num_processes"] = processes
    started = time.perf_counter()
    result = engine.train(str(data), str(out), params, **options)
    wall = time.perf_counter() - started
    ranks = result.get("ranks") or []
    return {
        "processes": processes, "steps": result["steps"], "wall_s": round(wall, 1),
        "train_s": result["seconds"], "train_tokens": result["train_tokens"], "tokens_per_s": result["tokens_per_s"],
        "train_loss": result["train_loss"],
        "threads_per_process": ranks[0]["threads"] if ranks else torch.get_num_threads(),
        "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in ranks] or None,
        "peak_rss_mb_parent": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    from common import bench_settings

    from llm_module.engine import Engine

    args = parse_args()
    counts = [int(c) for c in args.processes.split(",")]
    scratch = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    try:
        records = json.loads(DATA.read_text())[: args.records]
        data = scratch / "train.json"
        data.write_text(json.dumps(records))
        engine = Engine(bench_settings(scratch / "home"))
        engine.setup(args.model)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        rows = [run(engine, data, scratch / f"run-{n}", n, args) for n in counts]
        engine.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for row in rows:
        print(json.dumps(row))
    base = rows[0]
    for row in rows[1:]:
        speed = row["tokens_per_s"] / base["tokens_per_s"]
        print(f"{row['processes']} vs {base['processes']} processes: training tokens/s x{speed:.2f}, "
              f"wall time x{row['wall_s'] / base['wall_s']:.2f}")
    print(f"machine: {len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.1f}")
    print("command: python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]))


if __name__ == "__main__":
    main()
