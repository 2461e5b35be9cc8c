"""Single-stream greedy decoding with llama.cpp on a GGUF file; run by bench_speed.py in bench/.env/llama-venv.

    bench/.env/llama-venv/bin/python bench/llama_cpp_worker.py MODEL.gguf PROMPT_FILE --new-tokens 128

Prints one JSON line: tokens/s of each repeat, time to first token, tokens generated.
``use_extra_bufts=False``: llama.cpp's AMX buffer path crashes on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("gguf")
    parser.add_argument("prompt_file")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()

    from llama_cpp import Llama

    llm = Llama(model_path=args.gguf, n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads,
                verbose=False, use_extra_bufts=False)
    prompt = open(args.prompt_file, encoding="utf-8").read()
    tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    rates, first_token_s = [], []
    for _ in range(args.repeat + 1):  # the first run warms up
        llm.reset()
        start = time.perf_counter()
        generated, first = 0, None
        for _token in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
            if first is None:
                first = time.perf_counter() - start
            generated += 1  # past EOS too: every engine decodes exactly --new-tokens, like min_new_tokens
            if generated >= args.new_tokens:
                break
        rates.append(generated / (time.perf_counter() - start))
        first_token_s.append(first)
    print(json.dumps({"tokens_per_s": rates[1:], "first_token_s": first_token_s[1:], "generated": generated,
                      "threads": args.threads}))


if __name__ == "__main__":
    main()
