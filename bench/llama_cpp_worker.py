"""Single-stream greedy decoding with llama.cpp on a GGUF file; run by bench_speed.py in bench/.env/llama-venv.

    bench/.env/llama-venv/bin/python bench/llama_cpp_worker.py MODEL.gguf PROMPT_FILE --new-tokens 128

Prints one JSON line: tokens/s of each repeat, time to first token, tokens generated. With
``--serve`` it warms up, then runs once per ``run`` line on stdin and answers each with a JSON
line, so the bench can take its turns between the other engines' runs.
``use_extra_bufts=False``: llama.cpp's AMX buffer path crashes on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("gguf")
    parser.add_argument("prompt_file")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--serve", action="store_true", help="one run per 'run' line on stdin")
    args = parser.parse_args()

    from llama_cpp import Llama

    llm = Llama(model_path=args.gguf, n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads,
                verbose=False, use_extra_bufts=False)
    prompt = open(args.prompt_file, encoding="utf-8").read()
    tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)

    def run() -> tuple[float, float, int]:
        llm.reset()
        start = time.perf_counter()
        generated, first = 0, None
        for _token in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
            if first is None:
                first = time.perf_counter() - start
            generated += 1  # past EOS too: every engine decodes exactly --new-tokens, like min_new_tokens
            if generated >= args.new_tokens:
                break
        return generated / (time.perf_counter() - start), first, generated

    run()  # warm-up
    if args.serve:
        print(json.dumps({"ready": True, "threads": args.threads}), flush=True)
        for line in sys.stdin:
            if line.strip() == "run":
                rate, first, generated = run()
                print(json.dumps({"tokens_per_s": rate, "first_token_s": first, "generated": generated}), flush=True)
        return
    runs = [run() for _ in range(args.repeat)]
    print(json.dumps({"tokens_per_s": [r[0] for r in runs], "first_token_s": [r[1] for r in runs],
                      "generated": runs[-1][2], "threads": args.threads}))


if __name__ == "__main__":
    main()
