"""HTTP service benchmark: per-call overhead against in-process calls, and tokens/s under concurrency.

    python bench/bench_http.py                       # the bundled default model
    python bench/bench_http.py --model PATH --clients 1,4,8 --new-tokens 32

1. Overhead: the same action (model_info, and generate with 1 new token) called in-process
   and over HTTP on loopback; the difference of the medians is the HTTP path's cost (target <= 5 ms).
2. Throughput: 1, 4 and 8 clients, each sending generate calls back to back (greedy, exactly
   --new-tokens tokens each), against the same model served with batching off, then on.
   Aggregate tokens/s and the ratio to one client (target: 8 clients >= 4x one client, batching on).
Servers run one at a time on 127.0.0.1 so they do not compete for the CPU.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

PROMPTS = ["The capital of France is", "Write a haiku about the sea:", "List three prime numbers:",
           "Explain what a graph is:", "Once upon a time", "The best way to learn is",
           "Translate 'good morning' to Spanish:", "A short poem about autumn:"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, model: str | None, batching: bool, window_ms: float, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "llm_module", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--batching" if batching else "--no-batching", "--batch-window-ms", str(window_ms),
                "--log-level", "warning"]
        if model:
            args += ["--model", model]
        from llm_module.paths import model_cache_dir

        # A private home (state) but the shared model cache: no GGUF re-conversion per run.
        env = {**os.environ, "LLM_MODULE_HOME": str(workdir / ("on" if batching else "off")),
               "LLM_MODULE_CACHE": str(model_cache_dir())}
        self.log = open(workdir / f"server-{'on' if batching else 'off'}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited ({self.proc.returncode}); see {self.log.name}")
            try:
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:  # refused while starting, or slow while the model loads
                pass
            time.sleep(0.3)
        raise SystemExit("server did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def median_ms(call, repeat: int) -> float:
    call()  # warm
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure_overhead(server: Server, model: str | None, repeat: int) -> dict:
    from llm_module import llm
    from llm_module.engine import Engine, set_default_engine

    engine = Engine(batching=False)
    engine.setup(model)
    set_default_engine(engine)
    http = requests.Session()
    options = {"max_new_tokens": 1, "do_sample": False}

    def over_http(action: str, body: dict):
        response = http.post(f"{server.url}/{action}", json=body, timeout=60)
        response.raise_for_status()

    figures = {}
    for label, local, remote in [
        ("model_info", lambda: llm.model_info(), lambda: over_http("model_info", {})),
        ("generate 1 token", lambda: llm.generate(PROMPTS[0], **options),
         lambda: over_http("generate", {"prompt": PROMPTS[0], "**kwargs": options})),  # as jaseci's hook sends
    ]:
        local_ms, remote_ms = median_ms(local, repeat), median_ms(remote, repeat)
        figures[label] = (local_ms, remote_ms, remote_ms - local_ms)
    engine.close()
    return figures


def throughput(server: Server, clients: int, per_client: int, new_tokens: int) -> float:
    """Aggregate generated tokens/s of ``clients`` threads each sending ``per_client`` calls back to back."""

    def client(index: int) -> int:
        session = requests.Session()
        for i in range(per_client):
            body = {"prompt": PROMPTS[(index + i) % len(PROMPTS)], "max_new_tokens": new_tokens,
                    "min_new_tokens": new_tokens, "do_sample": False}
            response = session.post(f"{server.url}/v1/generate", json=body, timeout=600)
            response.raise_for_status()
        return per_client * new_tokens

    client(0)  # warm the server's first-call paths
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(client, range(clients)))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model path (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--window-ms", type=float, default=5.0)
    parser.add_argument("--overhead-repeat", type=int, default=50)
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="bench-http-"))

    print(f"# reproduce: python bench/bench_http.py {shlex.join(sys.argv[1:])}".rstrip())
    print(f"# model: {args.model or 'default'}; cpus: {os.cpu_count()}; torch threads: default; loopback only")

    results: dict[bool, dict[int, float]] = {}
    for batching in (False, True):
        server = Server(args.model, batching, args.window_ms, workdir)
        try:
            if batching:
                print("\n## per-call overhead (median ms; in-process vs HTTP on loopback)")
                for label, (local, remote, extra) in measure_overhead(server, args.model,
                                                                      args.overhead_repeat).items():
                    print(f"{label:18s} in-process {local:8.2f}   http {remote:8.2f}   overhead {extra:6.2f}"
                          f"   {'OK' if extra <= 5 else 'OVER 5 ms'}")
            results[batching] = {n: throughput(server, n, args.requests_per_client, args.new_tokens)
                                 for n in clients}
        finally:
            server.stop()

    print(f"\n## aggregate tokens/s ({args.new_tokens} new tokens a call, {args.requests_per_client} calls "
          f"a client, window {args.window_ms} ms)")
    print(f"{'clients':>8} {'batching off':>14} {'batching on':>13} {'on/off':>8} {'on vs 1 client':>15}")
    base = results[True][clients[0]]
    for n in clients:
        off, on = results[False][n], results[True][n]
        print(f"{n:>8} {off:>14.1f} {on:>13.1f} {on / off:>8.2f} {on / base:>14.2f}x")
    top = clients[-1]
    ratio = results[True][top] / base
    print(f"\n{top} clients vs {clients[0]} with batching on: {ratio:.2f}x "
          f"({'meets' if ratio >= 4 else 'misses'} the 4x target)")


if __name__ == "__main__":
    main()
