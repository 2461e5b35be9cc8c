"""How transformers' own continuous batching (``model.generate_batch``) does on this CPU.

Issue 18 asked to measure it before writing a scheduler of our own. It runs 8 chat prompts
of 32 greedy tokens through ``generate_batch`` (paged KV cache, its own scheduler) and through
plain ``model.generate`` on the same 8 prompts as one padded batch, with the fp32 model and with
the served int4 layers (llm_module's ``prepare``), and prints tokens/s for each.

    python bench/hf_continuous_batching.py [--new-tokens 32] [--rows 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROMPTS, chat_prompt, emit, load_reference_model, log, shared_models_dir  # noqa: E402


def measure(fn, tokens: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    fn()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rows", type=int, default=8)
    args = parser.parse_args()

    import torch
    from transformers import GenerationConfig

    results = {}
    for label, quantize in (("fp32", "none"), ("int4 (served layers)", "int4")):
        loaded = load_reference_model()
        model, tok = loaded.model, loaded.tokenizer
        if quantize != "none":
            from llm_module.runtime.prepare import prepare
            from llm_module.settings import Settings

            prepare(model, Settings(quantize=quantize, cache=shared_models_dir()), device="cpu",
                    source=loaded.source)
        prompts = [chat_prompt(tok, p) for p in (PROMPTS * 4)[: args.rows]]
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        total = args.rows * args.new_tokens
        config = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

        def padded_generate(model=model, tok=tok, prompts=prompts, config=config) -> None:
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                model.generate(**enc, generation_config=config)

        def continuous(model=model, ids=ids, config=config) -> None:
            with torch.inference_mode():
                model.generate_batch(ids, generation_config=config, progress_bar=False)

        row = {"model.generate (one padded batch)": measure(padded_generate, total)}
        try:
            row["generate_batch (continuous batching)"] = measure(continuous, total)
        except Exception as exc:  # a failure is a finding too
            row["generate_batch (continuous batching)"] = f"failed: {type(exc).__name__}: {exc}"[:300]
        log(f"{label}: {row}")
        results[label] = row
        del model, padded_generate, continuous
    emit({"rows": args.rows, "new_tokens": args.new_tokens, "tokens_per_s": results})


if __name__ == "__main__":
    main()
