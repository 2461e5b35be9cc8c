"""Run the whole bench suite and write bench/README.md (figures beside their baselines, as ratios).

    python bench/run.py                 # everything (~1 h 15 min on an idle 2-core machine)
    python bench/run.py --quick         # small sizes: a smoke run of every section
    python bench/run.py --sections single,streams --repeat 5

Every section runs in its own process (clean memory figures, no warm caches shared between
sections) and prints one ``RESULT {json}`` line; the raw figures go to bench/results.json and
bench/README.md is rewritten after each section (a cut-short run still reports). Native llama.cpp
(llama-server, llama-bench) is measured side by side when bench/setup_llama_server.sh has built it
into bench/.env; `make bench` builds it first (~10 min, once) and then runs this.
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

# section: (script, whether the script takes the section's name as its first argument)
SCRIPTS = {
    "quality": ("bench_speed.py", True), "single": ("bench_speed.py", True), "threads": ("bench_speed.py", True),
    "overhead": ("bench_speed.py", True), "concurrency": ("bench_speed.py", True),
    "setup": ("bench_speed.py", True), "memory": ("bench_speed.py", True),
    "http": ("bench_http.py", False),
    "streams": ("bench_serving.py", True), "curves": ("bench_serving.py", True), "openai": ("bench_serving.py", True),
    "training": ("bench_training.py", False),
    "load": ("load_test.py", False),
    "chaos": ("chaos_soak.py", False),
}
ALL_SECTIONS = tuple(SCRIPTS)
TIMEOUT_S = 4 * 3600  # a section that runs longer than this is stopped and reported as failed


def section_args(section: str, a) -> list[str]:
    quick = a.quick
    sizes = {
        "quality": ["--new-tokens", str(min(a.new_tokens, 64))],
        "single": ["--new-tokens", str(a.new_tokens), "--repeat", str(a.repeat)],
        "threads": ["--new-tokens", "32" if quick else "64", "--calls", "2" if quick else "3",
                    "--repeat", str(a.repeat)],  # the thread-robustness ratio is noisy: every round counts
        "overhead": ["--calls", str(a.overhead_calls)],
        "concurrency": ["--new-tokens", str(a.concurrent_tokens), "--calls", str(a.calls),
                        "--repeat", str(max(1, a.repeat - 1)), "--adapters", "8"],
        "setup": ["--repeat", str(a.repeat)] + (["--skip-cold"] if a.skip_cold else []),
        "memory": ["--adapters", "8"],
        "http": ["--clients", "1,4,8", "--requests-per-client", str(a.calls), "--new-tokens", str(a.concurrent_tokens),
                 "--repeat", str(max(1, a.repeat - 1)), "--overhead-repeat", str(max(10, a.overhead_calls // 4))],
        "streams": ["--new-tokens", "16" if quick else "128", "--repeat", str(max(1, a.repeat - 1)),
                    "--long-tokens", "64" if quick else "256"],
        "curves": ["--new-tokens", "8" if quick else "32", "--requests-per-client", "1" if quick else "2",
                   "--repeat", "1" if quick else str(max(2, a.repeat - 1))],
        "openai": ["--calls", str(max(10, a.overhead_calls // 2)), "--repeat", str(a.repeat + 2)],
        "training": ["--records", str(a.train_records), "--heldout", "8" if quick else "20",
                     "--epochs", str(a.train_epochs)],
        "load": (["--requests", "60", "--clients", "4", "--adapters", "2", "--train-at", "10", "--train-records", "16"]
                 if quick else ["--requests", "2000", "--clients", "8", "--adapters", "3", "--train-at", "300"]),
        "chaos": ["--seconds", str(a.chaos_seconds)],
    }
    return sizes[section]


def run_section(section: str, args, logs: Path) -> dict:
    script, named = SCRIPTS[section]
    cmd = [sys.executable, str(BENCH_DIR / script)] + ([section] if named else []) + section_args(section, args)
    log(f"running {section}: {shlex.join(cmd[1:])} (load average {os.getloadavg()[0]:.1f})")
    start = time.perf_counter()
    with open(logs / f"{section}.log", "w") as err:
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=BENCH_DIR.parent,
                                  timeout=TIMEOUT_S)
            stdout, returncode = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as exc:
            stdout, returncode = exc.stdout or "", "timeout"
    seconds = time.perf_counter() - start
    shown = [str(Path(c).relative_to(BENCH_DIR.parent)) if c.startswith(str(BENCH_DIR)) else c for c in cmd[1:]]
    base = {"section": section, "command": "python " + shlex.join(shown), "seconds": round(seconds, 1),
            "returncode": returncode}
    for line in (stdout or "").splitlines():
        if line.startswith(RESULT_PREFIX):
            return {**base, **json.loads(line[len(RESULT_PREFIX):])}
    return {**base, "failed": (logs / f"{section}.log").read_text(errors="replace")[-3000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(ALL_SECTIONS), help=f"some of {', '.join(ALL_SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--new-tokens", type=int, default=128, help="single stream")
    parser.add_argument("--concurrent-tokens", type=int, default=32, help="per call under concurrency")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3, help="calls per concurrent caller")
    parser.add_argument("--overhead-calls", type=int, default=200)
    parser.add_argument("--train-records", type=int, default=40)
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--chaos-seconds", type=int, default=300)
    parser.add_argument("--skip-cold", action="store_true", help="skip the cold setup (GGUF conversion)")
    parser.add_argument("--output", default=str(BENCH_DIR / "README.md"))
    parser.add_argument("--results", default=str(BENCH_DIR / "results.json"))
    parser.add_argument("--merge", action="store_true",
                        help="keep the other sections' figures of --results (re-run some sections only)")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.concurrent_tokens, args.repeat = 32, 16, 2
        args.calls, args.overhead_calls, args.train_records, args.train_epochs = 1, 40, 8, 1
        args.chaos_seconds = min(args.chaos_seconds, 60)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(ALL_SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; pick from {', '.join(ALL_SECTIONS)}")
    logs = BENCH_DIR / ".cache" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results_path = Path(args.results)
    started = time.strftime("%Y-%m-%d %H:%M")
    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    if args.merge and results_path.exists():
        results = json.loads(results_path.read_text())["results"]
    for section in sections:  # the files are rewritten after each section: a cut-short run still reports
        results[section] = run_section(section, args, logs)
        meta = {"command": "python bench/run.py " + shlex.join(sys.argv[1:]), "started": started,
                "load_before": load_before, "load_after": os.getloadavg()}
        ordered = {s: results[s] for s in ALL_SECTIONS if s in results}
        results_path.write_text(json.dumps({"meta": meta, "results": ordered}, indent=1))
        write_readme(Path(args.output), meta, ordered)
    log(f"wrote {args.output} and {results_path}")


if __name__ == "__main__":
    main()
