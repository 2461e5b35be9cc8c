"""A bounded chaos soak of `llm-module serve`: generation under every kind of admin change at once.

Eight clients (``--clients``) generate until ``--seconds`` run out, each request with a random
adapter (the base model, an adapter of the shared ``--adapters-dir``, or one an admin loads by
path) and random options (greedy or sampled), streamed or not, through the plain API
(/v1/generate, /v1/generate/stream) or the OpenAI API (/v1/chat/completions, both ways). Meanwhile
one admin client loops, in a shuffled order each cycle: load / unload an adapter by path, set the
default adapter, take an adapter folder out of ``--adapters-dir`` or put it back (then POST
/v1/adapters/reload), rewrite a folder's files (a "retrained" adapter: reloaded), evaluate, a short
training job (waited for, its adapter unloaded after), and ``setup`` of the same model (restore).

Invariants (each reported with its figure; ``ok`` only if all hold):
* no 5xx answer, in the status line or in-band in a stream;
* no request lost or hung: every request is answered within ``--request-timeout`` s, with its
  result or with a clear error (a 4xx whose body names the problem: an adapter that was just
  unloaded is a 404 or 409, never a silent wrong answer);
* no request answered by the wrong adapter: each adapter's greedy answer to each prompt is known
  (taken before the soak; the adapters are random LoRAs far enough apart that their answers
  differ); a greedy answer equal to ANOTHER adapter's known answer (and not its own) is a mix-up.
  Answers equal to no known one are counted as "drifted" (batch numerics flipping a near-tie
  token) and reported, not failed;
* memory bounded: resident memory at the end is less than ``--max-growth-pct`` (15 %) above the
  resident memory after the warm-up (the admin's first whole cycle, and at least a quarter of the
  run);
* the admin's ops all succeed, the training jobs finish ("done"), the adapters and default the
  server lists after every admin op (and at the end) are the ones the admin expects, and at the
  end every adapter still gives its known greedy answer.

    python bench/chaos_soak.py --seconds 120            # prints a summary and one RESULT {json} line
    from chaos_soak import run_soak; report = run_soak(seconds=30)   # a short one, for a test
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, OurServer, log, make_adapters, percentile, rss_mib, sse_events  # noqa: E402

ADAPTER_STRENGTH = 0.3  # random lora_B scale: far enough from each other that a mix-up shows in the text
PROMPTS = ["Name a fruit.", "Say hello.", "Name a color.", "Name an animal."]
ROUTES = ("generate", "generate/stream", "openai chat", "openai chat stream")
EXTRA = "extra"  # the adapter the admin loads by path (not from the shared folder)
ACTIVE_JOB_STATES = ("queued", "running", "cancelling")


# ------------------------------------------------------------------------------------------ clients
class Outcome:
    __slots__ = ("route", "adapter", "greedy", "prompt", "status", "seconds", "text", "error", "clear")

    def __init__(self, route: str, adapter: str, greedy: bool, prompt: str) -> None:
        self.route, self.adapter, self.greedy, self.prompt = route, adapter, greedy, prompt
        self.status: int | None = None  # HTTP status (in-band error status for a stream that failed midway)
        self.seconds = 0.0
        self.text: str | None = None
        self.error: str | None = None  # an exception: the request was lost (timeout, reset, malformed answer)
        self.clear = True  # a 4xx/5xx answer carried an error body with a message


def _error_status(body: dict) -> tuple[int | None, bool]:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, False
    return error.get("status") or error.get("code"), bool(error.get("message"))


def request_once(session, url: str, route: str, adapter: str, prompt: str, options: dict, timeout: float) -> Outcome:
    """One request; never raises (an exception is recorded as the outcome's error)."""
    out = Outcome(route, adapter, not options.get("do_sample", False), prompt)
    start = time.perf_counter()
    try:
        if route.startswith("generate"):
            body = {"prompt": prompt, "chat": True, "adapter": adapter, **options}
            path = "/v1/generate/stream" if route == "generate/stream" else "/v1/generate"
        else:
            body = {"model": adapter, "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": options["max_new_tokens"],
                    "temperature": options.get("temperature", 1.0) if options.get("do_sample") else 0}
            for key in ("top_p", "seed"):
                if key in options:
                    body[key] = options[key]
            body["stream"] = route.endswith("stream")
            path = "/v1/chat/completions"
        with session.post(url + path, json=body, timeout=timeout, stream=route.endswith("stream")) as response:
            out.status = response.status_code
            if response.status_code >= 400:
                try:
                    _, out.clear = _error_status(response.json())
                except ValueError:
                    out.clear = False
            elif route == "generate":
                out.text = response.json()["results"][0]["generated_text"]
            elif route == "openai chat":
                out.text = response.json()["choices"][0]["message"]["content"]
            else:
                out.text = _read_stream(response, route, out)
    except Exception as exc:  # lost: a timeout, a reset connection, a malformed answer
        out.error = f"{type(exc).__name__}: {exc}"[:300]
    out.seconds = time.perf_counter() - start
    return out


def _read_stream(response, route: str, out: Outcome) -> str | None:
    text = ""
    for event, data in sse_events(response):
        if route == "generate/stream":
            if event == "error":
                out.status, out.clear = _error_status(json.loads(data))
                return None
            if event == "done":
                return text
            text += json.loads(data).get("text", "")
        else:
            if data == "[DONE]":
                return text
            chunk = json.loads(data)
            if "error" in chunk:
                out.status, out.clear = _error_status(chunk)
                return None
            for choice in chunk.get("choices", []):
                text += (choice.get("delta") or {}).get("content") or ""
    raise RuntimeError("the stream ended without its final event")


def random_options(rng: random.Random, max_new_tokens: int) -> dict:
    if rng.random() < 0.7:
        return {"max_new_tokens": max_new_tokens, "do_sample": False}
    return {"max_new_tokens": max_new_tokens, "do_sample": True, "temperature": rng.choice([0.5, 0.8, 1.0, 1.3]),
            "top_p": rng.choice([0.8, 0.95, 1.0]), "seed": rng.randrange(1000)}


# -------------------------------------------------------------------------------------------- admin
class Admin:
    """Changes the server's adapters and model, keeps what it expects the server to list, checks it."""

    def __init__(self, url: str, root: Path, shared: list[str], rng: random.Random, timeout: float,
                 job_timeout: float) -> None:
        self.url, self.root, self.rng, self.timeout, self.job_timeout = url, root, rng, timeout, job_timeout
        self.session = requests.Session()
        self.shared = shared
        self.expected: set[str] = {*shared, EXTRA}
        self.default: str | None = None
        self.parked: str | None = None  # a shared adapter whose folder is out of adapters_dir
        self.ops: dict[str, int] = {}
        self.errors: list[str] = []
        self.mismatches: list[str] = []
        self.jobs: list[dict] = []
        self.cycles = 0
        self.cycle_done = threading.Event()
        self.trained = 0

    def call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> dict | list:
        response = self.session.request(method, self.url + path, json=body, timeout=timeout or self.timeout)
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path} answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def check(self, when: str) -> None:
        listed = self.call("GET", "/v1/adapters")
        names = {a["name"] for a in listed}
        default = next((a["name"] for a in listed if a.get("default")), None)
        if names != self.expected or default != self.default:
            self.mismatches.append(f"after {when}: listed {sorted(names)} default {default!r}; expected "
                                   f"{sorted(self.expected)} default {self.default!r}")

    # ---- the ops
    def op_extra(self) -> None:
        if EXTRA in self.expected:
            self.call("DELETE", f"/v1/adapters/{EXTRA}")
            self.expected.discard(EXTRA)
            self.default = None if self.default == EXTRA else self.default
        else:
            self.call("POST", "/v1/adapters", {"path": str(self.root / "src" / EXTRA), "name": EXTRA})
            self.expected.add(EXTRA)

    def op_default(self) -> None:
        name = self.rng.choice([None, *sorted(self.expected - {n for n in self.expected if n.startswith("chaos-")})])
        self.call("PUT", "/v1/adapters/default", {"name": name})
        self.default = name

    def op_folder(self) -> None:
        """Take a shared adapter's folder out of adapters_dir, or put it back; then reload from the folder."""
        shared_dir, parked_dir = self.root / "shared", self.root / "parked"
        if self.parked is None:
            name = self.rng.choice(self.shared)
            shutil.move(str(shared_dir / name), str(parked_dir / name))
            self.parked = name
            self.expected.discard(name)
            self.default = None if self.default == name else self.default
        else:
            shutil.move(str(parked_dir / self.parked), str(shared_dir / self.parked))
            self.expected.add(self.parked)
            self.parked = None
        self.call("POST", "/v1/adapters/reload")

    def op_retrain(self) -> None:
        """Rewrite a shared adapter's files (same weights, new files), as a retrained final/ would be: reloaded."""
        candidates = [n for n in self.shared if n != self.parked]
        name = self.rng.choice(candidates)
        folder = self.root / "shared" / name
        fresh = self.root / "shared" / f".{name}.new"
        shutil.copytree(self.root / "src" / name, fresh)
        time.sleep(0.01)
        for file in fresh.iterdir():
            os.utime(file)
        backup = self.root / "shared" / f".{name}.old"
        os.rename(folder, backup)
        os.rename(fresh, folder)
        shutil.rmtree(backup)
        report = self.call("POST", "/v1/adapters/reload")
        if name in report.get("failed", {}):
            raise RuntimeError(f"reloading the rewritten {name} failed: {report['failed'][name]}")

    def op_evaluate(self) -> None:
        adapter = self.rng.choice([None, *sorted(n for n in self.expected if not n.startswith("chaos-"))])
        self.call("POST", "/v1/evaluate", {"data_file": "eval.json", "adapter": adapter})

    def op_train(self) -> None:
        self.trained += 1
        name = f"chaos-{self.trained}"
        job = self.call("POST", "/v1/jobs/train", {
            "data_file": "train.json", "output_dir": f"runs/{name}",
            "training_params": {"EPOCHS": 1, "MICRO_BATCH_SIZE": 2, "BATCH_SIZE": 2, "CUTOFF_LEN": 128},
            "training_args_kwargs": {"max_steps": 2, "save_strategy": "no"}})
        deadline = time.monotonic() + self.job_timeout
        state = job
        while state.get("state") in ACTIVE_JOB_STATES and time.monotonic() < deadline:
            time.sleep(1)
            state = self.call("GET", f"/v1/jobs/{job['job_id']}")
        self.jobs.append({"job_id": job["job_id"], "state": state.get("state"), "error": state.get("error")})
        if state.get("state") != "done":
            raise RuntimeError(f"training job {job['job_id']} ended {state.get('state')!r}: {state.get('error')}")
        self.expected.add(name)  # a finished run's adapter goes live under its output folder's name
        self.check(f"training {name}")
        self.call("DELETE", f"/v1/adapters/{name}")
        self.expected.discard(name)

    def op_setup(self) -> None:
        self.call("POST", "/setup", {}, timeout=max(self.timeout, 600))  # restore: the same model and adapters

    def run(self, deadline: float, train: bool, setup: bool) -> None:
        ops = {"extra": self.op_extra, "default": self.op_default, "folder": self.op_folder,
               "retrain": self.op_retrain, "evaluate": self.op_evaluate}
        if train:
            ops["train"] = self.op_train
        if setup:
            ops["setup"] = self.op_setup
        while time.monotonic() < deadline:
            order = list(ops)
            self.rng.shuffle(order)
            for name in order:
                if time.monotonic() >= deadline:
                    return
                self.ops[name] = self.ops.get(name, 0) + 1
                try:
                    ops[name]()
                    self.check(name)
                except Exception as exc:
                    self.errors.append(f"{name}: {type(exc).__name__}: {exc}"[:400])
            self.cycles += 1
            self.cycle_done.set()

    def reconcile(self) -> None:
        """The end state: every folder back, EXTRA loaded, default a0."""
        if self.parked is not None:
            self.op_folder()
        if EXTRA not in self.expected:
            self.op_extra()
        self.call("PUT", "/v1/adapters/default", {"name": self.shared[0]})
        self.default = self.shared[0]


# --------------------------------------------------------------------------------------------- soak
def run_soak(seconds: float = 60, *, clients: int = 8, adapters: int = 3, max_new_tokens: int = 8,
             request_timeout: float = 120, job_timeout: float = 600, max_growth_pct: float = 15.0,
             train: bool = True, setup: bool = True, seed: int = 0, workdir: Path | str | None = None,
             server_flags: tuple[str, ...] = ()) -> dict:
    """Start a server of its own, soak it for ``seconds``, stop it; return the figures and ``ok``."""
    from llm_module.runtime.threads import run_in_fresh_thread

    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="llm-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    paths = run_in_fresh_thread(make_adapters, root / "src", adapters + 1, strength=ADAPTER_STRENGTH, seed=200,
                                targets=("q_proj", "v_proj"))
    shared = [p.name for p in paths[:-1]]
    paths[-1].rename(root / "src" / EXTRA)
    (root / "shared").mkdir(exist_ok=True)
    (root / "parked").mkdir(exist_ok=True)
    for name in shared:
        shutil.copytree(root / "src" / name, root / "shared" / name)
    records = json.loads((REPO / "tests" / "data" / "catalog_train.json").read_text())
    (root / "train.json").write_text(json.dumps(records[:8]))
    (root / "eval.json").write_text(json.dumps(records[8:16]))
    rng = random.Random(seed)
    server = OurServer(root / "server", "--data-root", str(root), "--adapters-dir", str(root / "shared"),
                       *server_flags)
    try:
        return _soak(server, root, shared, rng, seconds, clients, max_new_tokens, request_timeout, job_timeout,
                     max_growth_pct, train, setup)
    finally:
        server.stop()
        if not workdir:
            shutil.rmtree(root, ignore_errors=True)


def _soak(server: OurServer, root: Path, shared: list[str], rng: random.Random, seconds: float, clients: int,
          max_new_tokens: int, request_timeout: float, job_timeout: float, max_growth_pct: float, train: bool,
          setup: bool) -> dict:
    url = server.url
    session = requests.Session()
    admin = Admin(url, root, shared, random.Random(rng.random()), request_timeout, job_timeout)
    admin.call("POST", "/v1/adapters", {"path": str(root / "src" / EXTRA), "name": EXTRA})
    admin.check("start")
    choices = ["base", *shared, EXTRA]
    greedy = {"max_new_tokens": max_new_tokens, "do_sample": False}
    reference = {}
    for prompt in PROMPTS:
        for adapter in choices:
            out = request_once(session, url, "generate", adapter, prompt, greedy, request_timeout)
            if out.text is None:
                raise RuntimeError(f"reference answer failed: {out.status} {out.error}")
            reference[(prompt, adapter)] = out.text
    distinct = {p: len({reference[(p, a)] for a in choices}) for p in PROMPTS}

    outcomes: list[Outcome] = []
    lock = threading.Lock()
    started = time.monotonic()
    deadline = started + seconds
    samples: list[tuple[float, float]] = []  # (seconds since start, RSS MiB)
    sampling = threading.Event()

    def client(index: int) -> None:
        own_rng = random.Random(rng.random() + index)
        sess = requests.Session()
        while time.monotonic() < deadline:
            route, adapter, prompt = own_rng.choice(ROUTES), own_rng.choice(choices), own_rng.choice(PROMPTS)
            out = request_once(sess, url, route, adapter, prompt, random_options(own_rng, max_new_tokens),
                               request_timeout)
            with lock:
                outcomes.append(out)

    def sampler() -> None:
        while not sampling.is_set():
            try:
                samples.append((time.monotonic() - started, rss_mib(server.proc.pid)["now_mib"]))
            except OSError:
                return
            sampling.wait(0.5)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    admin_thread = threading.Thread(target=admin.run, args=(deadline, train, setup), daemon=True)
    sample_thread = threading.Thread(target=sampler, daemon=True)
    sample_thread.start()
    for thread in [*threads, admin_thread]:
        thread.start()
    warm_at = None
    while time.monotonic() < deadline:
        if warm_at is None and admin.cycle_done.is_set() and time.monotonic() - started >= seconds / 4:
            warm_at = time.monotonic() - started
        time.sleep(0.2)
    bound = request_timeout + 5
    for thread in threads:
        thread.join(bound)
    hung_clients = sum(thread.is_alive() for thread in threads)
    admin_thread.join(job_timeout + max(request_timeout, 600))
    admin_hung = admin_thread.is_alive()
    wall = time.monotonic() - started
    try:
        admin.reconcile()
        admin.check("the end")
    except Exception as exc:
        admin.errors.append(f"reconcile: {type(exc).__name__}: {exc}"[:400])
    final_answers = {}
    for adapter in choices:
        out = request_once(session, url, "generate", adapter, PROMPTS[0], greedy, request_timeout)
        final_answers[adapter] = out.text == reference[(PROMPTS[0], adapter)]
    time.sleep(1.5)  # the serving thread goes idle and frees its cache
    sampling.set()
    sample_thread.join(5)
    rss_end = rss_mib(server.proc.pid)["now_mib"]
    if warm_at is None:  # the admin's first cycle did not end within the run: a quarter of the run
        warm_at = seconds / 4
    rss_warm = next((mib for at, mib in samples if at >= warm_at), samples[-1][1] if samples else rss_end)
    growth = (rss_end - rss_warm) / rss_warm * 100

    with lock:
        done = list(outcomes)
    answered = [o for o in done if o.error is None]
    ok = [o for o in answered if o.text is not None]
    server_errors = [o for o in answered if o.status is not None and o.status >= 500]
    refused = [o for o in answered if o.text is None and o.status is not None and 400 <= o.status < 500]
    unclear = [o for o in answered if o.text is None and not o.clear]
    lost = [o for o in done if o.error is not None]
    checked = [o for o in ok if o.greedy]
    mixed = [o for o in checked if o.text != reference[(o.prompt, o.adapter)] and any(
        o.text == reference[(o.prompt, other)] != reference[(o.prompt, o.adapter)] for other in choices
        if other != o.adapter)]
    own = [o for o in checked if o.text == reference[(o.prompt, o.adapter)]]
    latencies = [o.seconds for o in answered]
    by_status: dict[str, int] = {}
    for o in answered:
        if o.text is None:
            by_status[str(o.status)] = by_status.get(str(o.status), 0) + 1
    invariants = {
        "no 5xx": (not server_errors, f"{len(server_errors)} answered 5xx"),
        "no request lost or hung": (not lost and not hung_clients and not admin_hung,
                                    f"{len(lost)} lost (exception or over {request_timeout:g} s), "
                                    f"{hung_clients} client threads and {int(admin_hung)} admin thread still waiting"),
        "every refusal is a clear error": (not unclear, f"{len(unclear)} error answers without a message"),
        "no request answered by the wrong adapter": (not mixed, f"{len(mixed)} of {len(checked)} greedy answers "
                                                                 "checked"),
        f"RSS growth after warm-up < {max_growth_pct:g} %": (growth < max_growth_pct, f"{growth:+.1f} %"),
        "admin ops all succeeded": (not admin.errors, f"{len(admin.errors)} failed"),
        "adapters and default as the admin expects (after every op and at the end)":
            (not admin.mismatches, f"{len(admin.mismatches)} mismatches"),
        "training jobs done": (all(j["state"] == "done" for j in admin.jobs),
                               f"{sum(j['state'] == 'done' for j in admin.jobs)}/{len(admin.jobs)} done"),
        "each adapter's greedy answer unchanged at the end": (all(final_answers.values()),
                                                              f"{sum(final_answers.values())}/{len(final_answers)}"),
    }
    return {
        "seconds": round(wall, 1), "asked_seconds": seconds, "clients": clients, "adapters": choices,
        "max_new_tokens": max_new_tokens,
        "distinct_answers_per_prompt": distinct,
        "requests": len(done), "answered": len(ok), "refused_4xx": len(refused), "refused_by_status": by_status,
        "server_errors_5xx": len(server_errors), "lost": len(lost), "unclear_errors": len(unclear),
        "greedy_checked": len(checked), "own_answer": len(own), "mixed_up": len(mixed),
        "drifted": len(checked) - len(own) - len(mixed),
        "by_route": {r: sum(o.route == r for o in done) for r in ROUTES},
        "drifted_by_route": {r: sum(o.route == r and o not in own and o not in mixed for o in checked) for r in ROUTES},
        "drift_examples": [{"route": o.route, "adapter": o.adapter, "prompt": o.prompt,
                            "reference": reference[(o.prompt, o.adapter)], "answer": o.text}
                           for o in checked if o not in own and o not in mixed][:3],
        "p50_s": round(percentile(latencies, 50), 3) if latencies else None,
        "p99_s": round(percentile(latencies, 99), 3) if latencies else None,
        "max_s": round(max(latencies), 3) if latencies else None,
        "requests_per_s": round(len(done) / wall, 2),
        "admin": {"cycles": admin.cycles, "ops": admin.ops, "errors": admin.errors[:10],
                  "mismatches": admin.mismatches[:10], "jobs": admin.jobs},
        "memory": {"warm_after_s": round(warm_at, 1), "rss_warm_mib": round(rss_warm), "rss_end_mib": round(rss_end),
                   "rss_max_sampled_mib": round(max((m for _, m in samples), default=rss_end)),
                   "growth_pct": round(growth, 1)},
        "final_state": {"expected": sorted(admin.expected), "default": admin.default},
        "final_answers": final_answers,
        "first_lost": lost[0].error if lost else None,
        "first_5xx": f"{server_errors[0].route} {server_errors[0].status}" if server_errors else None,
        "invariants": {name: {"pass": passed, "figure": figure} for name, (passed, figure) in invariants.items()},
        "ok": all(passed for passed, _ in invariants.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=3, help="adapters in the shared folder")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--request-timeout", type=float, default=120, help="a request unanswered by then is lost")
    parser.add_argument("--job-timeout", type=float, default=600)
    parser.add_argument("--max-growth-pct", type=float, default=15.0)
    parser.add_argument("--no-train", action="store_true", help="leave the training job out of the admin's ops")
    parser.add_argument("--no-setup", action="store_true", help="leave setup out of the admin's ops")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    log(f"chaos soak starting, {args.seconds:g} s (load average {os.getloadavg()[0]:.1f})")
    report = run_soak(args.seconds, clients=args.clients, adapters=args.adapters, max_new_tokens=args.max_new_tokens,
                      request_timeout=args.request_timeout, job_timeout=args.job_timeout,
                      max_growth_pct=args.max_growth_pct, train=not args.no_train, setup=not args.no_setup,
                      seed=args.seed)
    for name, rule in report["invariants"].items():
        print(f"{'PASS' if rule['pass'] else 'FAIL'}  {name}: {rule['figure']}", file=sys.stderr)
    print(f"{report['requests']} requests ({report['answered']} answered, {report['refused_4xx']} refused 4xx), "
          f"p50 {report['p50_s']} s, p99 {report['p99_s']} s; admin {report['admin']['cycles']} cycles "
          f"{report['admin']['ops']}; {'OK' if report['ok'] else 'NOT OK'}", file=sys.stderr)
    print("RESULT " + json.dumps({"section": "chaos", **report, "load_average_end": os.getloadavg(),
                                  "reproduce": "python bench/chaos_soak.py " + " ".join(sys.argv[1:])}), flush=True)


if __name__ == "__main__":
    main()
