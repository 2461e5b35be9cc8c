"""The serving core over HTTP (`llm-module serve`, default model), each figure beside a baseline of the same run.

    python bench/bench_serving.py streams [--new-tokens 64 --repeat 3 --long-tokens 256]
    python bench/bench_serving.py curves  [--new-tokens 32 --requests-per-client 2]
    python bench/bench_serving.py openai  [--calls 100 --schema-tokens 64]

Sections (bench/run.py runs each in its own process):

streams   Three servers, up together, load sent to one at a time, in turn each repeat (a lone
          stream, then the 8 streams, each after a 0.5 s pause, on one server before the next):
          `llm-module serve` (the serving core), the same with `--max-batch 1` (the fair
          one-at-a-time baseline: one model thread, one request at a time) and llama.cpp's native
          `llama-server -np 8 -c 8192 --cont-batching -t 2` on the same GGUF.
          * one stream and 8 concurrent streams of --new-tokens greedy tokens each (same rendered
            chat prompts, same token counts: ours min_new_tokens, llama.cpp ignore_eos): aggregate
            tokens/s, and each client's time to its first text piece (the first SSE event with text);
          * a short request (8 tokens) sent while a --long-tokens stream decodes, against the same
            short request alone;
          * 8 callers with 8 different sampling settings at once, against one caller sending the
            same 8 requests one after another (ours only).
curves    One server (`--max-loaded-adapters 80`): aggregate tokens/s and p50/p99 request latency
          against 1/2/4/8/16/32 concurrent clients, and against 1/8/64 loaded random LoRA adapters
          with 8 clients (8 adapters in use; with 1 loaded, all 8 use it); report.py plots both.
openai    The OpenAI routes' own cost against /v1/generate for the same 1-token greedy request
          (completions vs a plain prompt, chat completions vs messages), and structured output's
          cost per token: chat completions with a response_format json_schema vs the same request
          unconstrained (decode tokens/s, from each stream's first to its last piece).
Each prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PROMPTS,
    LlamaServer,
    OurServer,
    Stats,
    chat_prompt,
    default_tokenizer,
    emit,
    greedy,
    llama_server_built,
    log,
    machine,
    make_adapters,
    percentile,
    post_json,
    run_parallel,
    sse_events,
    stream_llama,
    stream_openai_chat,
    stream_ours,
)

from llm_module.runtime.threads import run_in_fresh_thread  # noqa: E402

WORKDIR = Path(tempfile.mkdtemp(prefix="bench-serving-"))
OURS, ONE_AT_A_TIME, LLAMA = "ours", "ours --max-batch 1", "llama-server"
SETTLE_S = 0.5  # pause before each timed stream measurement (under the serving thread's 1 s idle exit)

# Eight callers, eight different sampling settings (each seeded where it samples).
SAMPLING_SETTINGS = [
    {"do_sample": True, "temperature": 0.7, "seed": 1},
    {"do_sample": True, "temperature": 1.0, "top_p": 0.9, "seed": 2},
    {"do_sample": True, "temperature": 0.8, "top_k": 40, "seed": 3},
    {"do_sample": True, "temperature": 0.9, "repetition_penalty": 1.2, "seed": 4},
    {"do_sample": False},
    {"do_sample": True, "temperature": 1.2, "min_p": 0.05, "seed": 5},
    {"do_sample": True, "temperature": 0.6, "presence_penalty": 0.5, "frequency_penalty": 0.5, "seed": 6},
    {"do_sample": False, "repetition_penalty": 1.3, "no_repeat_ngram_size": 3},
]


# ------------------------------------------------------------------------------------------ streams
class Targets:
    """How each server kind is asked for the same work."""

    def __init__(self, servers: dict, prompts: list[str]) -> None:
        self.servers = servers
        self.prompts = prompts  # rendered chat prompts (llama.cpp gets the same text ours renders)

    def stream(self, kind: str, index: int, new_tokens: int, session=None) -> dict:
        session = session or requests.Session()
        url = self.servers[kind].url
        if kind == LLAMA:
            out = stream_llama(session, url, self.prompts[index % len(self.prompts)], new_tokens)
            if out["tokens"] not in (None, new_tokens):
                raise RuntimeError(f"llama-server generated {out['tokens']} tokens, not {new_tokens}")
            return out
        body = {"prompt": PROMPTS[index % len(PROMPTS)], "chat": True, **greedy(new_tokens)}
        return stream_ours(session, url, body)

    def short(self, kind: str, new_tokens: int, session) -> float:
        url = self.servers[kind].url
        if kind == LLAMA:
            body = {"prompt": self.prompts[1], "n_predict": new_tokens, "ignore_eos": True, "temperature": 0,
                    "top_k": 1}
            return post_json(session, url, "/completion", body)[0]
        return post_json(session, url, "/v1/generate", {"prompt": PROMPTS[1], "chat": True, **greedy(new_tokens)})[0]

    def long_stream_body(self, kind: str, new_tokens: int) -> tuple[str, dict]:
        if kind == LLAMA:
            return "/completion", {"prompt": self.prompts[0], "n_predict": new_tokens, "ignore_eos": True,
                                   "stream": True, "temperature": 0, "top_k": 1}
        return "/v1/generate/stream", {"prompt": PROMPTS[0], "chat": True, **greedy(new_tokens)}


def settle() -> None:
    """Let the last measurement's threads go quiet before the next one starts (llama.cpp's threads
    poll for a while after a request; ours keep the serving thread for 1 s): each first piece is then
    timed from the same state, a server whose threads are up and idle, with nobody else computing."""
    time.sleep(SETTLE_S)


def one_stream(targets: Targets, kind: str, new_tokens: int) -> tuple[float, float]:
    out = targets.stream(kind, 0, new_tokens)
    return new_tokens / out["seconds"], out["first_s"]


def many_streams(targets: Targets, kind: str, count: int, new_tokens: int) -> tuple[float, list[float]]:
    wall, outs = run_parallel(lambda i: targets.stream(kind, i, new_tokens), count)
    return count * new_tokens / wall, [o["first_s"] for o in outs]


def short_under_long(targets: Targets, kind: str, short_tokens: int, long_tokens: int) -> tuple[float, float]:
    """(the short request alone, the short request sent once the long stream is decoding), seconds."""
    session = requests.Session()
    alone = targets.short(kind, short_tokens, session)
    path, body = targets.long_stream_body(kind, long_tokens)
    decoding, stop, failure = threading.Event(), threading.Event(), []

    def long_request() -> None:
        try:
            with requests.post(targets.servers[kind].url + path, json=body, stream=True, timeout=600) as response:
                response.raise_for_status()
                pieces = 0
                for _event, data in sse_events(response):
                    pieces += 1
                    if pieces >= 2:  # its first token came and it is decoding
                        decoding.set()
                    if stop.is_set() or data in ("[DONE]",):
                        break
        except Exception as exc:  # surfaced below
            failure.append(exc)
        finally:
            decoding.set()

    thread = threading.Thread(target=long_request, daemon=True)
    thread.start()
    decoding.wait(600)
    under = targets.short(kind, short_tokens, session)
    stop.set()  # the long request is cancelled when its reader goes away (both servers do)
    thread.join(600)
    if failure:
        raise failure[0]
    time.sleep(0.3)
    return alone, under


def sampling_mix(url: str, new_tokens: int) -> tuple[float, float]:
    """(one caller sending the 8 settings' requests one after another, 8 callers at once), tokens/s."""
    session = requests.Session()

    def request(index: int, sess=None) -> None:
        body = {"prompt": PROMPTS[index], "chat": True, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
                **SAMPLING_SETTINGS[index]}
        post_json(sess or requests.Session(), url, "/v1/generate", body)

    start = time.perf_counter()
    for index in range(len(SAMPLING_SETTINGS)):
        request(index, session)
    one = len(SAMPLING_SETTINGS) * new_tokens / (time.perf_counter() - start)
    wall, _ = run_parallel(request, len(SAMPLING_SETTINGS))
    return one, len(SAMPLING_SETTINGS) * new_tokens / wall


def streams(args) -> dict:
    tokenizer = default_tokenizer()
    prompts = [chat_prompt(tokenizer, p) for p in PROMPTS]
    servers: dict = {OURS: OurServer(WORKDIR / "ours"),
                     ONE_AT_A_TIME: OurServer(WORKDIR / "one", "--max-batch", "1")}
    llama_note = None
    if llama_server_built():
        servers[LLAMA] = LlamaServer(WORKDIR / "llama", slots=8, context=8192, threads=len(os.sched_getaffinity(0)))
    else:
        llama_note = "native llama.cpp not built: run bash bench/setup_llama_server.sh"
    targets = Targets(servers, prompts)
    n, count = args.new_tokens, args.streams
    one = {k: {"rate": [], "first": []} for k in servers}
    many = {k: {"rate": [], "worst_first": [], "median_first": []} for k in servers}
    short = {k: {"alone": [], "under": []} for k in servers}
    mix = {"one": [], "eight": []}
    try:
        for kind in servers:  # warm-up: first-call paths, prefix cache, llama's slots
            one_stream(targets, kind, 8)
            many_streams(targets, kind, count, 8)
        sampling_mix(servers[OURS].url, 4)
        for round_index in range(args.repeat):
            for kind in servers:  # a lone stream, then the burst, on one server: both from the same state
                settle()
                rate, first = one_stream(targets, kind, n)
                one[kind]["rate"].append(rate)
                one[kind]["first"].append(first)
                settle()
                rate, firsts = many_streams(targets, kind, count, n)
                many[kind]["rate"].append(rate)
                many[kind]["worst_first"].append(max(firsts))
                many[kind]["median_first"].append(Stats(firsts).median)
            for kind in servers:
                alone, under = short_under_long(targets, kind, args.short_tokens, args.long_tokens)
                short[kind]["alone"].append(alone)
                short[kind]["under"].append(under)
            one_rate, eight_rate = sampling_mix(servers[OURS].url, n)
            mix["one"].append(one_rate)
            mix["eight"].append(eight_rate)
            log(f"streams round {round_index + 1}: one {[round(one[k]['rate'][-1], 1) for k in servers]}, "
                f"{count} streams {[round(many[k]['rate'][-1], 1) for k in servers]}, sampling mix "
                f"{one_rate:.1f} -> {eight_rate:.1f} tokens/s")
        describe = {OURS: "llm-module serve (--max-batch 16, the default)",
                    ONE_AT_A_TIME: "llm-module serve --max-batch 1 (one request at a time on the model thread)"}
        if LLAMA in servers:
            describe[LLAMA] = servers[LLAMA].describe()
        serving = servers[OURS].describe().get("serving", {})
    finally:
        for server in servers.values():
            server.stop()

    def stats(values: list[float]) -> dict:
        return Stats(values).to_dict()

    return {
        "servers": describe, "serving": serving, "new_tokens": n, "streams": count, "short_tokens": args.short_tokens,
        "long_tokens": args.long_tokens, "llama_note": llama_note,
        "one_stream": {k: {"tokens_per_s": stats(v["rate"]), "first_s": stats(v["first"])} for k, v in one.items()},
        "many_streams": {k: {"tokens_per_s": stats(v["rate"]), "worst_first_s": stats(v["worst_first"]),
                             "median_first_s": stats(v["median_first"])} for k, v in many.items()},
        "short_under_long": {k: {"alone_s": stats(v["alone"]), "under_long_s": stats(v["under"])}
                             for k, v in short.items()},
        "sampling_mix": {"one_caller_tokens_per_s": stats(mix["one"]),
                         "eight_callers_tokens_per_s": stats(mix["eight"]), "settings": SAMPLING_SETTINGS},
        "machine": machine(),
    }


# ------------------------------------------------------------------------------------------- curves
def load_level(url: str, clients: int, per_client: int, new_tokens: int,
               adapters: list[str] | None = None) -> tuple[float, list[float]]:
    """(aggregate tokens/s, each request's latency) of ``clients`` clients sending requests back to back."""

    def client(index: int) -> list[float]:
        session = requests.Session()
        latencies = []
        for i in range(per_client):
            body = {"prompt": PROMPTS[(index + i) % len(PROMPTS)], "chat": True, **greedy(new_tokens)}
            if adapters:
                body["adapter"] = adapters[index % len(adapters)]
            latencies.append(post_json(session, url, "/v1/generate", body)[0])
        return latencies

    wall, per = run_parallel(client, clients)
    return clients * per_client * new_tokens / wall, [x for row in per for x in row]


def adapters_in_use(names: list[str], loaded: int, clients: int) -> list[str] | None:
    """The adapters the clients use: none (base model), every loaded one if fewer than the clients, else
    ``clients`` of them spread over the loaded ones."""
    if loaded == 0:
        return None
    if loaded < clients:
        return names[:loaded]
    return [names[i * loaded // clients] for i in range(clients)]


def curves(args) -> dict:
    levels = [int(c) for c in args.clients.split(",")]
    adapter_levels = [int(c) for c in args.adapter_levels.split(",")]
    paths = run_in_fresh_thread(make_adapters, WORKDIR / "adapters", max(adapter_levels))
    names = [p.name for p in paths]
    clients_table = {str(c): {"rate": [], "latency": []} for c in levels}
    adapters_table = {str(a): {"rate": [], "latency": []} for a in [0, *adapter_levels]}
    with OurServer(WORKDIR / "curves", "--max-loaded-adapters", str(max(adapter_levels) + 16)) as server:
        url = server.url
        session = requests.Session()
        load_level(url, 2, 1, 4)  # warm-up
        loaded: list[str] = []

        def ensure_loaded(count: int) -> None:
            while len(loaded) < count:
                name = names[len(loaded)]
                post_json(session, url, "/v1/adapters", {"path": str(paths[len(loaded)]), "name": name})
                loaded.append(name)
            while len(loaded) > count:
                response = session.delete(f"{url}/v1/adapters/{loaded.pop()}", timeout=60)
                response.raise_for_status()

        for round_index in range(args.repeat):
            ensure_loaded(0)
            for c in levels:
                rate, latencies = load_level(url, c, args.requests_per_client, args.new_tokens)
                clients_table[str(c)]["rate"].append(rate)
                clients_table[str(c)]["latency"] += latencies
            for count in [0, *adapter_levels]:
                ensure_loaded(count)
                in_use = adapters_in_use(names, count, args.in_use)
                rate, latencies = load_level(url, args.in_use, args.requests_per_client, args.new_tokens, in_use)
                adapters_table[str(count)]["rate"].append(rate)
                adapters_table[str(count)]["latency"] += latencies
            log(f"curves round {round_index + 1}: clients "
                f"{ {c: round(v['rate'][-1], 1) for c, v in clients_table.items()} }, adapters "
                f"{ {a: round(v['rate'][-1], 1) for a, v in adapters_table.items()} }")
        serving = server.describe().get("serving", {})

    def summarize(row: dict) -> dict:
        lat = row["latency"]
        return {"tokens_per_s": Stats(row["rate"]).to_dict(), "p50_s": percentile(lat, 50),
                "p99_s": percentile(lat, 99), "requests": len(lat)}

    return {"clients": {c: summarize(v) for c, v in clients_table.items()},
            "adapters": {a: summarize(v) for a, v in adapters_table.items()},
            "in_use": args.in_use, "new_tokens": args.new_tokens, "requests_per_client": args.requests_per_client,
            "server": "llm-module serve --max-loaded-adapters " + str(max(adapter_levels) + 16), "serving": serving,
            "adapter_kind": "random LoRA r=8 on q/k/v/o of the default model", "machine": machine()}


# ------------------------------------------------------------------------------------------- openai
PRODUCT_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "price": {"type": "number"},
                   "colors": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                   "year": {"type": "integer"}},
    "required": ["name", "price", "colors", "year"],
}
SCHEMA_PROMPT = "Describe a fictional outdoor jacket as JSON: its name, price, colors and year."


def openai(args) -> dict:
    prompt = PROMPTS[3]
    messages = [{"role": "user", "content": prompt}]
    with OurServer(WORKDIR / "openai") as server:
        url = server.url
        model = server.describe()["model"]
        session = requests.Session()
        pairs = {
            "completions vs /v1/generate (plain prompt)": (
                ("/v1/generate", {"prompt": prompt, "max_new_tokens": 1, "do_sample": False}),
                ("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0})),
            "chat completions vs /v1/generate (messages)": (
                ("/v1/generate", {"messages": messages, "max_new_tokens": 1, "do_sample": False}),
                ("/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": 1, "temperature": 0})),
        }
        times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in pairs}
        for _ in range(5):  # warm-up
            for (p1, b1), (p2, b2) in pairs.values():
                post_json(session, url, p1, b1)
                post_json(session, url, p2, b2)
        for _ in range(args.calls):  # each pair in turn, call by call
            for label, ((p1, b1), (p2, b2)) in pairs.items():
                times[label][0].append(post_json(session, url, p1, b1)[0] * 1000)
                times[label][1].append(post_json(session, url, p2, b2)[0] * 1000)
        overhead = {label: {"plain_ms": Stats(a).to_dict(), "openai_ms": Stats(b).to_dict(),
                            "extra_ms": Stats(b).median - Stats(a).median} for label, (a, b) in times.items()}

        schema_body = {"model": model, "messages": [{"role": "user", "content": SCHEMA_PROMPT}],
                       "max_tokens": args.schema_tokens, "temperature": 0}
        constrained_body = {**schema_body, "response_format": {
            "type": "json_schema", "json_schema": {"name": "product", "schema": PRODUCT_SCHEMA}}}
        runs = {"unconstrained": schema_body, "response_format json_schema": constrained_body}
        decode: dict[str, list[float]] = {k: [] for k in runs}
        tokens: dict[str, list[int]] = {k: [] for k in runs}
        valid, finished = 0, 0
        for body in runs.values():
            stream_openai_chat(session, url, body)  # warm-up (the schema's grammar is compiled once)
        for _ in range(args.repeat):
            for label, body in runs.items():
                out = stream_openai_chat(session, url, body)
                if out["tokens"] and out["tokens"] > 1 and out["last_s"] > out["first_s"]:
                    decode[label].append((out["tokens"] - 1) / (out["last_s"] - out["first_s"]))
                tokens[label].append(out["tokens"])
                if label != "unconstrained" and out["finish_reason"] == "stop":
                    finished += 1
                    try:
                        json.loads(out["text"])
                        valid += 1
                    except ValueError:
                        pass
        serving = server.describe().get("serving", {})
    structured = {label: {"decode_tokens_per_s": Stats(v).to_dict() if v else None,
                          "tokens": Stats([float(t) for t in tokens[label] if t]).to_dict() if any(tokens[label])
                          else None} for label, v in decode.items()}
    return {"overhead": overhead, "calls": args.calls, "structured": structured, "schema": PRODUCT_SCHEMA,
            "schema_prompt": SCHEMA_PROMPT, "max_tokens": args.schema_tokens,
            "constrained_valid_json": f"{valid} of {finished} finished ({args.repeat} runs)", "serving": serving,
            "machine": machine()}


SECTIONS = {"streams": streams, "curves": curves, "openai": openai}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=sorted(SECTIONS))
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per request (streams, curves)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams (streams)")
    parser.add_argument("--short-tokens", type=int, default=8)
    parser.add_argument("--long-tokens", type=int, default=256)
    parser.add_argument("--clients", default="1,2,4,8,16,32", help="curves: concurrent clients")
    parser.add_argument("--adapter-levels", default="1,8,64", help="curves: adapters loaded")
    parser.add_argument("--in-use", type=int, default=8, help="curves: clients (and adapters in use)")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--calls", type=int, default=100, help="openai: calls per route")
    parser.add_argument("--schema-tokens", type=int, default=96)
    args = parser.parse_args()
    log(f"{args.section} starting (load average {os.getloadavg()[0]:.1f})")
    emit({"section": args.section, **SECTIONS[args.section](args), "load_average_end": os.getloadavg()})


if __name__ == "__main__":
    main()
