"""Run the whole bench suite and write bench/README.md (figures beside their baselines, as ratios).

    python bench/run.py                 # everything, ~25 min on an idle 2-core machine
    python bench/run.py --quick         # small sizes: a smoke run of every section (~8 min)
    python bench/run.py --sections single,concurrency --repeat 5

Every section runs in its own process (clean memory figures, no warm caches shared between
sections); the raw figures go to bench/results.json. llama.cpp is measured when
bench/setup_llama_cpp.sh has built it into bench/.env; `make bench` builds it first
(~10 min, once) and then runs this.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_DIR, RESULT_PREFIX, log  # noqa: E402
from report import write_readme  # noqa: E402

SPEED_SECTIONS = ("quality", "single", "overhead", "concurrency", "setup", "memory")
EXTERNAL = {"http": "bench_http.py", "training": "bench_training.py"}
ALL_SECTIONS = SPEED_SECTIONS + tuple(EXTERNAL)


def section_args(section: str, args) -> list[str]:
    sizes = {
        "quality": ["--new-tokens", str(min(args.new_tokens, 64))],
        "single": ["--new-tokens", str(args.new_tokens), "--repeat", str(args.repeat)],
        "overhead": ["--calls", str(args.overhead_calls)],
        "concurrency": ["--new-tokens", str(args.concurrent_tokens), "--calls", str(args.calls),
                        "--repeat", str(max(1, args.repeat - 1)), "--adapters", "8",
                        "--window-ms", str(args.window_ms)],
        "setup": ["--repeat", str(args.repeat)] + (["--skip-cold"] if args.skip_cold else []),
        "memory": ["--adapters", "8"],
        "http": ["--clients", "1,4,8", "--requests-per-client", str(args.calls),
                 "--new-tokens", str(args.concurrent_tokens), "--overhead-repeat", str(args.overhead_calls // 4)],
        "training": ["--records", str(args.train_records), "--epochs", str(args.train_epochs)],
    }
    return sizes[section]


def run_section(section: str, args, logs: Path) -> dict:
    script = EXTERNAL.get(section, "bench_speed.py")
    cmd = [sys.executable, str(BENCH_DIR / script)]
    cmd += ([] if section in EXTERNAL else [section]) + section_args(section, args)
    if not (BENCH_DIR / script).exists():
        return {"section": section, "missing": f"bench/{script} does not exist yet"}
    log(f"running {section}: {shlex.join(cmd[1:])}")
    start = time.perf_counter()
    with open(logs / f"{section}.log", "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=BENCH_DIR.parent)
    seconds = time.perf_counter() - start
    base = {"section": section, "command": "python " + shlex.join([str(Path(c).relative_to(BENCH_DIR.parent))
                                                                    if c.startswith(str(BENCH_DIR)) else c
                                                                    for c in cmd[1:]]),
            "seconds": round(seconds, 1), "returncode": proc.returncode}
    if section in EXTERNAL:
        return {**base, "output": proc.stdout}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return {**base, **json.loads(line[len(RESULT_PREFIX):])}
    return {**base, "failed": (logs / f"{section}.log").read_text()[-3000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(ALL_SECTIONS))
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--new-tokens", type=int, default=128, help="single stream")
    parser.add_argument("--concurrent-tokens", type=int, default=32, help="per call under concurrency")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3, help="calls per concurrent caller")
    parser.add_argument("--overhead-calls", type=int, default=200)
    parser.add_argument("--window-ms", type=float, default=0.0)
    parser.add_argument("--train-records", type=int, default=40)
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--skip-cold", action="store_true", help="skip the cold setup (GGUF conversion)")
    parser.add_argument("--output", default=str(BENCH_DIR / "README.md"))
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.concurrent_tokens, args.repeat = 32, 16, 2
        args.calls, args.overhead_calls, args.train_records, args.train_epochs = 1, 40, 8, 1
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(ALL_SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; pick from {', '.join(ALL_SECTIONS)}")
    logs = BENCH_DIR / ".cache" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M")
    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    for section in sections:  # the files are rewritten after each section: a cut-short run still reports
        results[section] = run_section(section, args, logs)
        meta = {"command": "python bench/run.py " + shlex.join(sys.argv[1:]), "started": started,
                "load_before": load_before, "load_after": os.getloadavg()}
        (BENCH_DIR / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        write_readme(Path(args.output), meta, results)
    log(f"wrote {args.output} and bench/results.json")


if __name__ == "__main__":
    main()
