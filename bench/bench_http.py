"""HTTP service benchmark: per-call overhead against in-process calls, and tokens/s under concurrency.

    python bench/bench_http.py                       # the bundled default model
    python bench/bench_http.py --clients 1,4,8 --new-tokens 32 --requests-per-client 3

1. Overhead: the same action (model_info, and generate with 1 new token) called in-process on an
   engine in this process and over HTTP on loopback (jaseci's remote-action protocol, as its hook
   sends it, and the plain /v1/generate); the difference of the medians is the HTTP path's cost.
2. Throughput: 1, 4 and 8 clients, each sending /v1/generate calls back to back (greedy, exactly
   --new-tokens tokens each), against `llm-module serve` (the serving core, --max-batch 16) and the
   fair baseline: the same server with --max-batch 1 (one model thread, requests served one at a
   time). Aggregate tokens/s; the 8-client ratio divides by the best one-client figure of the run.
Both servers stay up; load goes to one at a time, the servers and levels in turn each repeat.
Prints one ``RESULT {json}`` line (bench/run.py) after a readable summary on stderr.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OurServer, Stats, emit, greedy, log, machine, make_engine, run_parallel  # noqa: E402

PROMPTS = ["The capital of France is", "Write a haiku about the sea:", "List three prime numbers:",
           "Explain what a graph is:", "Once upon a time", "The best way to learn is",
           "Translate 'good morning' to Spanish:", "A short poem about autumn:"]
SERVERS = {"serving core (--max-batch 16)": [], "one at a time (--max-batch 1)": ["--max-batch", "1"]}


def median_ms(call, repeat: int) -> Stats:
    for _ in range(3):
        call()  # warm
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return Stats(times)


def measure_overhead(server: OurServer, workdir: Path, repeat: int) -> dict:
    from llm_module import llm

    engine = make_engine(workdir / "in-process-home")
    llm._engine = engine  # the jaseci actions of this process run on it
    http = requests.Session()
    options = {"max_new_tokens": 1, "do_sample": False}

    def over_http(path: str, body: dict):
        response = http.post(f"{server.url}{path}", json=body, timeout=60)
        response.raise_for_status()

    figures = {}
    for label, local, remote in [
        ("model_info", lambda: llm.model_info(), lambda: over_http("/model_info", {})),
        ("generate 1 token, jaseci protocol (POST /generate)", lambda: llm.generate(PROMPTS[0], **options),
         lambda: over_http("/generate", {"prompt": PROMPTS[0], "**kwargs": options})),  # as jaseci's hook sends
        ("generate 1 token, POST /v1/generate", lambda: llm.generate(PROMPTS[0], **options),
         lambda: over_http("/v1/generate", {"prompt": PROMPTS[0], **options})),
    ]:
        local_ms = median_ms(local, repeat)
        time.sleep(1.2)  # the in-process serving thread ends: one long-lived torch thread at a time
        remote_ms = median_ms(remote, repeat)
        figures[label] = {"in_process_ms": local_ms.to_dict(), "http_ms": remote_ms.to_dict(),
                          "overhead_ms": remote_ms.median - local_ms.median}
    engine.close()
    return figures


def throughput(url: str, clients: int, per_client: int, new_tokens: int) -> float:
    """Aggregate generated tokens/s of ``clients`` threads each sending ``per_client`` calls back to back."""

    def client(index: int) -> int:
        session = requests.Session()
        for i in range(per_client):
            body = {"prompt": PROMPTS[(index + i) % len(PROMPTS)], **greedy(new_tokens)}
            response = session.post(f"{url}/v1/generate", json=body, timeout=600)
            response.raise_for_status()
        return per_client * new_tokens

    wall, tokens = run_parallel(client, clients)
    return sum(tokens) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--overhead-repeat", type=int, default=50)
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="bench-http-"))
    log(f"http starting (load average {os.getloadavg()[0]:.1f})")
    servers = {label: OurServer(workdir / f"server-{i}", *flags) for i, (label, flags) in enumerate(SERVERS.items())}
    try:
        overhead = measure_overhead(servers[next(iter(SERVERS))], workdir, args.overhead_repeat)
        table: dict[str, dict[str, list[float]]] = {label: {str(n): [] for n in levels} for label in servers}
        for server in servers.values():
            throughput(server.url, 2, 1, 4)  # warm the server's first-call paths
        for _ in range(args.repeat):
            for label, server in servers.items():
                for n in levels:
                    table[label][str(n)].append(throughput(server.url, n, args.requests_per_client, args.new_tokens))
                log(f"{label}: { {n: round(v[-1], 1) for n, v in table[label].items()} }")
    finally:
        for server in servers.values():
            server.stop()
    result = {"overhead": overhead,
              "throughput": {label: {n: Stats(v).to_dict() for n, v in row.items()} for label, row in table.items()},
              "servers": {label: "llm-module serve " + (" ".join(flags) or "(defaults: --max-batch 16)")
                          for label, flags in SERVERS.items()},
              "new_tokens": args.new_tokens, "requests_per_client": args.requests_per_client,
              "baseline": "the best one-client figure of the run (either server)",
              "reproduce": "python bench/bench_http.py " + shlex.join(sys.argv[1:]), "machine": machine(),
              "load_average_end": os.getloadavg()}
    for label, f in overhead.items():
        log(f"{label}: in-process {f['in_process_ms']['median']:.2f} ms, http {f['http_ms']['median']:.2f} ms, "
            f"overhead {f['overhead_ms']:.2f} ms")
    best_one = max(row[str(levels[0])]["median"] for row in result["throughput"].values())
    for label, row in result["throughput"].items():
        log(f"{label}: " + ", ".join(f"{n} clients {s['median']:.1f} tokens/s = {s['median'] / best_one:.2f}x"
                                     for n, s in row.items()))
    emit({"section": "http", **result})


if __name__ == "__main__":
    main()
