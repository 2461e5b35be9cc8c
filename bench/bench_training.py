"""llm.train's recipe against the seed module's, same data and LoRA settings, one run.

The seed recipe: every sample padded to CUTOFF_LEN, fp32, DataCollatorForLanguageModeling
(loss on prompt and response), the seed's Alpaca prompt. Ours: llm.train (dynamic padding,
batches grouped by length, the model's chat template, loss on the response only, LM head
only where there is a label). Both use the same LoRA config, optimizer, learning rate,
batch size and number of steps. Each recipe runs in its own process so peak memory is its own.

Figures: real (non-padding) training tokens per second, final loss (response tokens
including the EOS that makes a model stop, each model prompted in the format it was
trained on), peak RSS (or CUDA memory). Ratios are ours / seed.

    python bench/bench_training.py                      # default model, 40 catalog records, 2 epochs
    python bench/bench_training.py --records 120 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data" / "catalog_train.json"


def peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def response_loss(model, tokenizer, data_file: Path, template: str) -> float:
    from llm_module.training.data import load_examples
    from llm_module.training.evaluate import token_loss

    rows, _ = load_examples(data_file, tokenizer, data_format=None, prompt_template=template, cutoff_len=256,
                            train_on_inputs=False)
    total, tokens = token_loss(model, rows, pad_id=tokenizer.pad_token_id)
    return total / tokens


def run_ours(loaded, data_file: Path, params: dict, out: Path) -> dict:
    from llm_module.training import train_adapter

    result = train_adapter(loaded.model, loaded.tokenizer, data_file=data_file, output_dir=out, training_params=params,
                           resume_from_checkpoint=False, progress=lambda p: None, cancel=threading.Event(),
                           base_model_name=loaded.name, show_progress=False,
                           training_args_kwargs={"save_strategy": "no"})
    # get_peft_model injected the trained LoRA layers into loaded.model itself: it is the tuned model
    return {"tokens_per_s": result["tokens_per_s"], "train_tokens": result["train_tokens"],
            "seconds": result["seconds"], "steps": result["steps"],
            "final_loss": response_loss(loaded.model, loaded.tokenizer, data_file, "auto")}


def run_seed(loaded, data_file: Path, params: dict, out: Path) -> dict:
    """The seed module's pipeline: fixed-length padding, LM collator, Alpaca prompt, loss on everything."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from llm_module.prompts import alpaca_prompt

    tokenizer, cutoff = loaded.tokenizer, params["CUTOFF_LEN"]
    tokenizer.padding_side = "right"
    records = json.loads(data_file.read_text())
    texts = [alpaca_prompt(r["instruction"], r.get("input", "")) + r["output"] for r in records]
    encoded = [tokenizer(t, truncation=True, max_length=cutoff, padding="max_length") for t in texts]
    rows = [{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]} for e in encoded]
    model = get_peft_model(loaded.model, LoraConfig(
        r=params["LORA_R"], lora_alpha=params["LORA_ALPHA"], lora_dropout=params["LORA_DROPOUT"],
        target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=params["MICRO_BATCH_SIZE"],
        gradient_accumulation_steps=params["BATCH_SIZE"] // params["MICRO_BATCH_SIZE"],
        num_train_epochs=params["EPOCHS"], learning_rate=params["LEARNING_RATE"], warmup_steps=params["warmup_steps"],
        lr_scheduler_type="cosine", logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=loaded.device == "cpu", seed=42, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    real_tokens = sum(sum(r["attention_mask"]) for r in rows) * params["EPOCHS"]
    model.eval()
    return {"tokens_per_s": real_tokens / seconds, "train_tokens": real_tokens, "seconds": round(seconds, 2),
            "steps": output.global_step, "final_loss": response_loss(model, tokenizer, data_file, "alpaca")}


def worker(recipe: str, data_file: Path, params: dict) -> None:
    from llm_module.loader import load_model

    loaded = load_model(None)
    with tempfile.TemporaryDirectory() as tmp:
        figures = (run_ours if recipe == "ours" else run_seed)(loaded, data_file, params, Path(tmp) / recipe)
    figures["peak_memory_mb"] = round(peak_memory_mb(loaded.device), 1)
    print("RESULT " + json.dumps(figures))


def run_recipe(recipe: str, data_file: Path, params: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", recipe, "--data", str(data_file),
                           "--params", json.dumps(params)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{recipe} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=40, help="first N records of the catalog training data")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--worker", choices=("ours", "seed"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, Path(args.data), json.loads(args.params))
        return 0

    from llm_module.training.params import DEFAULTS

    params = {**{k: v for k, v in DEFAULTS.items() if k not in ("WARMUP_STEPS", "TARGET_MODULES")},
              "MICRO_BATCH_SIZE": 4, "BATCH_SIZE": 4, "EPOCHS": args.epochs, "CUTOFF_LEN": 256}
    records = json.loads(DATA.read_text())[: args.records]
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "catalog.json"
        data_file.write_text(json.dumps(records))
        steps = int(-(-len(records) // params["MICRO_BATCH_SIZE"]) * params["EPOCHS"])
        params["WARMUP_STEPS"] = params["warmup_steps"] = max(1, round(steps * 0.05))
        seed_params = {k: v for k, v in params.items() if k != "WARMUP_STEPS"}
        ours_params = {k: v for k, v in params.items() if k != "warmup_steps"}
        ours = run_recipe("ours", data_file, ours_params)
        seed = run_recipe("seed", data_file, seed_params)
    report = {
        "records": len(records), "params": params, "ours": ours, "seed": seed,
        "tokens_per_s_ratio": round(ours["tokens_per_s"] / seed["tokens_per_s"], 2),
        "final_loss_ours_minus_seed": round(ours["final_loss"] - seed["final_loss"], 4),
        "peak_memory_ratio": round(ours["peak_memory_mb"] / seed["peak_memory_mb"], 3),
    }
    print(json.dumps(report, indent=1))
    print(f"\nreal tokens/s: ours {ours['tokens_per_s']:.0f} vs seed {seed['tokens_per_s']:.0f} "
          f"= {report['tokens_per_s_ratio']}x; final loss ours {ours['final_loss']:.3f} vs seed "
          f"{seed['final_loss']:.3f}; peak memory {ours['peak_memory_mb']:.0f} vs {seed['peak_memory_mb']:.0f} MB")
    print(f"reproduce: python bench/bench_training.py --records {args.records} --epochs {args.epochs:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
