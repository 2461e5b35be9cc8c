"""Load test of the real server (loopback only, bounded): N generate requests from C concurrent
clients over the default model, mixing adapters, with a background training job part of the time.

The verdict is PASS only if every rule holds, each printed with its figure:
* failed requests = 0: ANY exception of a request counts (an HTTP error status, a refused or reset
  connection, a timeout, a malformed answer), not just a few kinds;
* mixed-up answers = 0: a greedy answer that equals another adapter's reference answer for the
  prompt (and not its own) was answered by the wrong adapter. Answers that differ from every
  reference are "drifted" (batch numerics changing a near-tie token: 5-19 % of answers measured);
* drifted answers <= --max-drift-pct (default 30 %): a wrong adapter for some rows mostly gives
  neither its own nor another's answer (its prompt's cached keys are its own adapter's), so it
  shows here: with odd slots given the wrong adapter on purpose, 31 of 66 answers (47 %) drifted
  and none read as mixed up;
* the training job finished: its state is "done" within --job-timeout s after the last request
  (failed, cancelled or still running is a FAIL);
* the trained adapter serves: once the job is done, a burst of requests (two per client, at once)
  mixes it with the base model and the other adapters; each of them counts as a request above;
* memory: resident memory at the end, after the last request AND after the training job ended
  and its adapter served, is at most --max-growth-pct (default 10 %) above the resident memory
  after the warm-up requests (the first 100, or a fifth of a shorter run). The peak is reported too.

    .venv/bin/python bench/load_test.py                      # 2000 requests, 8 clients
    .venv/bin/python bench/load_test.py --requests 300       # a quick look
Prints the figures, one line per rule, and ``RESULT {json}`` (bench/run.py renders it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, OurServer, emit, log, make_adapters, percentile  # noqa: E402

from llm_module.runtime.threads import run_in_fresh_thread  # noqa: E402

ADAPTER_STRENGTH = 0.3  # scale of the random lora_B weights: far enough apart that a mix-up shows
PROMPTS = ["Name a fruit.", "Say hello.", "Name a color.", "Count to three.", "Name an animal.", "Say goodbye."]
ACTIVE_JOB_STATES = ("queued", "running", "cancelling")


def generate(session, url: str, prompt: str, adapter: str, max_new_tokens: int) -> str:
    body = {"prompt": prompt, "adapter": adapter, "chat": True, "do_sample": False, "max_new_tokens": max_new_tokens}
    res = session.post(f"{url}/generate", json=body, timeout=300)
    res.raise_for_status()
    return res.json()[0]["generated_text"]


def run_load(*, requests_count: int = 2000, clients: int = 8, adapters: int = 3, max_new_tokens: int = 8,
             train_at: int = 300, train_records: int = 120, job_timeout: float = 1800,
             max_growth_pct: float = 10.0, max_drift_pct: float = 30.0) -> dict:
    root = Path(tempfile.mkdtemp(prefix="llm-load-"))
    paths = run_in_fresh_thread(make_adapters, root / "adapters", adapters, strength=ADAPTER_STRENGTH, seed=100,
                                targets=("q_proj", "v_proj"))
    names = [p.name for p in paths]
    records = json.loads((REPO / "tests" / "data" / "catalog_train.json").read_text())[:train_records]
    (root / "train.json").write_text(json.dumps(records))
    flags = ["--data-root", str(root), "--max-prompts", "64",
             *[a for name, path in zip(names, paths, strict=True) for a in ("--adapter", f"{name}={path}")]]
    server = OurServer(root / "server", *flags)
    import psutil

    proc = psutil.Process(server.proc.pid)
    warmup = min(100, max(1, requests_count // 5))
    try:
        session = requests.Session()
        choices = ["base", *names]
        reference = {(p, a): generate(session, server.url, p, a, max_new_tokens) for p in PROMPTS for a in choices}
        distinct = len({reference[(p, a)] for p in PROMPTS for a in choices})
        work = [(PROMPTS[i % len(PROMPTS)], choices[(i // len(PROMPTS)) % len(choices)])
                for i in range(requests_count)]
        results: list[tuple[float, str, str, str | None, str | None]] = []  # seconds, prompt, adapter, text, error
        lock, cursor = threading.Lock(), iter(range(requests_count))
        rss_warm: list[int] = []
        rss_peak = [0]
        job: dict = {}

        def timed_generate(sess, prompt: str, adapter: str) -> tuple[float, str, str, str | None, str | None]:
            start = time.perf_counter()
            try:
                text, error = generate(sess, server.url, prompt, adapter, max_new_tokens), None
            except Exception as exc:  # every exception is a failure
                text, error = None, f"{type(exc).__name__}: {exc}"
            return time.perf_counter() - start, prompt, adapter, text, error

        def client() -> None:
            sess = requests.Session()
            while True:
                with lock:
                    i = next(cursor, None)
                if i is None:
                    return
                if i == train_at:
                    try:
                        res = sess.post(f"{server.url}/v1/jobs/train", timeout=60, json={
                            "data_file": "train.json", "output_dir": "runs/during-load",
                            "training_params": {"EPOCHS": 1, "MICRO_BATCH_SIZE": 4, "BATCH_SIZE": 8}})
                        job.update(res.json() if res.status_code < 400 else {"start_error": res.text[:500]})
                    except Exception as exc:  # the job's absence fails the verdict below
                        job["start_error"] = f"{type(exc).__name__}: {exc}"
                outcome = timed_generate(sess, *work[i])
                with lock:
                    results.append(outcome)
                    rss = proc.memory_info().rss
                    rss_peak[0] = max(rss_peak[0], rss)
                    if len(results) == warmup:
                        rss_warm.append(rss)

        started = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        rss_requests_end = proc.memory_info().rss

        job_state: dict = {}
        if job.get("job_id"):
            deadline = time.monotonic() + job_timeout
            while True:
                job_state = session.get(f"{server.url}/v1/jobs/{job['job_id']}", timeout=30).json()
                rss_peak[0] = max(rss_peak[0], proc.memory_info().rss)
                if job_state.get("state") not in ACTIVE_JOB_STATES or time.monotonic() > deadline:
                    break
                time.sleep(2)
        trained = (job_state.get("result") or {}).get("adapter") or (job_state.get("params") or {}).get("adapter_name")
        if job_state.get("state") == "done" and trained:
            size = 2 * clients  # rows enough that per-row state kept after it would show in the memory rule
            burst = [(PROMPTS[i % len(PROMPTS)], [trained, *choices][i % (len(choices) + 1)]) for i in range(size)]
            answers: dict = {}

            def ask(i: int) -> None:
                answers[i] = timed_generate(requests.Session(), *burst[i])

            askers = [threading.Thread(target=ask, args=(i,)) for i in range(size)]
            for t in askers:
                t.start()
            for t in askers:
                t.join()
            after_job = [answers[i] for i in range(size)]
            results.extend(r for r in after_job if r[2] != trained)  # judged against their references
            failures_after_job = [r for r in after_job if r[4] is not None]
        else:
            after_job, failures_after_job = [], []
        time.sleep(1.5)  # the serving thread goes idle and frees its cache, as after any burst
        rss_end = proc.memory_info().rss

        latencies = [r[0] for r in results if r[4] is None]
        failures = [r for r in results if r[4] is not None] + [r for r in failures_after_job if r[2] == trained]
        answered = [r for r in results if r[4] is None]
        own = sum(1 for _, p, a, text, _ in answered if text == reference[(p, a)])
        mixed = sum(1 for _, p, a, text, _ in answered if text != reference[(p, a)]
                    and any(text == reference[(p, o)] != reference[(p, a)] for o in choices if o != a))
        drifted = len(answered) - own - mixed
        growth = (rss_end - rss_warm[0]) / rss_warm[0] * 100 if rss_warm else float("nan")
        state = job_state.get("state") if job.get("job_id") else None
        rules = {
            "no failed request (every exception counts)": (len(failures) == 0, f"{len(failures)} failed"),
            "no mixed-up adapter answer": (mixed == 0, f"{mixed} mixed up"),
            "the training job finished": (state == "done",
                                          f"state {state!r}" + (f", error {job_state.get('error')!r}"
                                                                if job_state.get("error") else "")
                                          + (f", start error {job['start_error']!r}" if "start_error" in job else "")),
            f"drifted answers <= {max_drift_pct:g} %": (
                drifted <= max_drift_pct / 100 * len(answered), f"{drifted} of {len(answered)}"),
            "the trained adapter answered in a mixed burst": (
                bool(after_job) and not failures_after_job, f"{len(after_job) - len(failures_after_job)} of "
                                                            f"{len(after_job)} answered, adapter {trained!r}"),
            f"RSS at the end (job ended) <= {max_growth_pct:g} % over after warm-up":
                (growth <= max_growth_pct, f"{growth:+.1f} %"),
        }
        figures = {
            "requests": len(results), "clients": clients, "train_at": train_at, "adapters": choices,
            "distinct_references": distinct,
            "failed_requests": len(failures), "mixed_up": mixed, "own_reference_match": f"{own}/{len(answered)}",
            "drifted": drifted,
            "p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
            "p99_ms": round(percentile(latencies, 99) * 1000, 1) if latencies else None,
            "requests_per_s": round(len(results) / wall, 2), "wall_s": round(wall, 1),
            "warmup_requests": warmup,
            "rss_after_warmup_mb": round(rss_warm[0] / 2**20) if rss_warm else None,
            "rss_requests_end_mb": round(rss_requests_end / 2**20), "rss_end_mb": round(rss_end / 2**20),
            "rss_peak_sampled_mb": round(rss_peak[0] / 2**20), "rss_growth_pct": round(growth, 1),
            "training_job": {k: job_state.get(k) for k in ("state", "error", "job_id")} if job_state else job or None,
            "rules": {name: {"pass": ok, "figure": figure} for name, (ok, figure) in rules.items()},
            "verdict": "PASS" if all(ok for ok, _ in rules.values()) else "FAIL",
            "first_failure": failures[0][4][:500] if failures else None,
            "drift_examples": [{"prompt": p, "adapter": a, "reference": reference[(p, a)], "answer": text}
                               for _, p, a, text, _ in answered if text != reference[(p, a)]][:3],
        }
        return figures
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--train-at", type=int, default=300, help="start a background training job at request N")
    parser.add_argument("--train-records", type=int, default=120, help="records of the job's training data")
    parser.add_argument("--job-timeout", type=float, default=1800,
                        help="seconds to wait for the job after the last request")
    parser.add_argument("--max-growth-pct", type=float, default=10.0)
    parser.add_argument("--max-drift-pct", type=float, default=30.0)
    args = parser.parse_args()
    log(f"load test starting (load average {os.getloadavg()[0]:.1f})")
    figures = run_load(requests_count=args.requests, clients=args.clients, adapters=args.adapters,
                       max_new_tokens=args.max_new_tokens, train_at=min(args.train_at, args.requests - 1),
                       train_records=args.train_records, job_timeout=args.job_timeout,
                       max_growth_pct=args.max_growth_pct, max_drift_pct=args.max_drift_pct)
    print(json.dumps(figures, indent=2), file=sys.stderr)
    for name, rule in figures["rules"].items():
        print(f"{'PASS' if rule['pass'] else 'FAIL'}  {name}: {rule['figure']}", file=sys.stderr)
    print(f"VERDICT: {figures['verdict']}", file=sys.stderr)
    print("command: .venv/bin/python bench/load_test.py " + " ".join(sys.argv[1:]), file=sys.stderr)
    emit({"section": "load", **figures, "reproduce": "python bench/load_test.py " + " ".join(sys.argv[1:]),
          "load_average_end": os.getloadavg()})


if __name__ == "__main__":
    main()
