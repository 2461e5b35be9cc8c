"""llm.train's recipe against the seed module's, same data and LoRA settings, one run.

The seed recipe: every sample padded to CUTOFF_LEN, fp32, DataCollatorForLanguageModeling
(loss on prompt and response, no end token: the pad token is the end token, and the collator
masks it), the seed's Alpaca prompt. Ours: llm.train (dynamic padding, batches grouped by
length, the model's chat template, loss on the response and its end token only, LM head only
where there is a label). Both use the same LoRA config (all linear layers, r, alpha, dropout),
optimizer, learning rate, schedule, warm-up, batch size, seed and number of steps. Each recipe
runs in its own process so peak memory is its own.

Measured the same way for both:
* time: wall seconds of ``Trainer.train`` itself (both recipes' trainers are timed by the same
  wrapper around ``transformers.Trainer.train``), so data preparation and saving are outside both;
* throughput: real (non-padding) training tokens per second of that time, and examples per second;
* quality: loss on HELD-OUT records (catalog records neither run trained on), on the same token
  set for both: the response tokens, tokenized apart from the prompt so both recipes score the very
  same ids, each model prompted in the format it was trained on. The end token is scored apart
  (the seed recipe never trains it, so including it would penalize a choice of the recipe, not
  its learning), and the untrained base model's loss is the reference for both;
* peak RSS (or CUDA memory) of each process.

    python bench/bench_training.py                      # default model, 40 catalog records, 2 epochs
    python bench/bench_training.py --records 120 --epochs 1
Prints one ``RESULT {json}`` line (bench/run.py) after a readable summary.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
DATA = REPO / "tests" / "data" / "catalog_train.json"
TRAIN_SECONDS: list[float] = []


def time_trainer_train() -> None:
    """Wrap ``transformers.Trainer.train`` (which both recipes' trainers inherit) in one timer."""
    import transformers

    original = transformers.Trainer.train

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            TRAIN_SECONDS.append(time.perf_counter() - start)

    transformers.Trainer.train = timed


def peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_text(record: dict, tokenizer, recipe: str) -> str:
    """The prompt each recipe trains with: ours the chat template (llm.train's 'auto'), the seed's Alpaca."""
    from llm_module.prompts import alpaca_prompt, render_prompt, user_content

    if recipe == "seed":
        return alpaca_prompt(record["instruction"], record.get("input", ""))
    return render_prompt(tokenizer, [{"role": "user", "content": user_content(record["instruction"],
                                                                               record.get("input", ""))}])


def heldout_losses(model, tokenizer, records: list[dict], recipe: str) -> dict:
    """Mean loss per response token (the same ids for both recipes) and per end token, on held-out records."""
    from llm_module.training.data import Tokenized
    from llm_module.training.evaluate import token_loss

    eos = tokenizer.eos_token_id
    response_rows, end_rows = [], []
    for record in records:
        prompt_ids = tokenizer(prompt_text(record, tokenizer, recipe), add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
        ids = prompt_ids + response_ids + [eos]
        masked = [-100] * len(prompt_ids)
        response_rows.append(Tokenized(ids, masked + response_ids + [-100]))
        end_rows.append(Tokenized(ids, masked + [-100] * len(response_ids) + [eos]))
    total, tokens = token_loss(model, response_rows, pad_id=tokenizer.pad_token_id)
    end_total, ends = token_loss(model, end_rows, pad_id=tokenizer.pad_token_id)
    return {"response_loss": total / tokens, "response_tokens": tokens, "end_token_loss": end_total / ends}


def run_ours(loaded, data_file: Path, params: dict, out: Path) -> dict:
    from llm_module.training import train_adapter
    from llm_module.training.data import load_examples

    rows, _ = load_examples(data_file, loaded.tokenizer, data_format=None, prompt_template="auto",
                            cutoff_len=params["CUTOFF_LEN"], train_on_inputs=False)
    result = train_adapter(loaded.model, loaded.tokenizer, data_file=data_file, output_dir=out, training_params=params,
                           resume_from_checkpoint=False, progress=lambda p: None, cancel=threading.Event(),
                           base_model_name=loaded.name, show_progress=False, seed=42,
                           training_args_kwargs={"save_strategy": "no"})
    # get_peft_model injected the trained LoRA layers into loaded.model itself: it is the tuned model
    return {"real_tokens_per_epoch": sum(len(r.input_ids) for r in rows), "examples": len(rows),
            "steps": result["steps"], "own_report": {k: result.get(k) for k in ("tokens_per_s", "seconds",
                                                                                 "train_tokens", "train_loss")}}


def run_seed(loaded, data_file: Path, params: dict, out: Path) -> dict:
    """The seed module's pipeline: fixed-length padding, LM collator, Alpaca prompt, loss on everything."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments, set_seed

    from llm_module.prompts import alpaca_prompt

    tokenizer, cutoff = loaded.tokenizer, params["CUTOFF_LEN"]
    tokenizer.padding_side = "right"
    records = json.loads(data_file.read_text())
    texts = [alpaca_prompt(r["instruction"], r.get("input", "")) + r["output"] for r in records]
    encoded = [tokenizer(t, truncation=True, max_length=cutoff, padding="max_length") for t in texts]
    rows = [{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]} for e in encoded]
    set_seed(42)  # lora_A's random init, as llm.train seeds it
    model = get_peft_model(loaded.model, LoraConfig(
        r=params["LORA_R"], lora_alpha=params["LORA_ALPHA"], lora_dropout=params["LORA_DROPOUT"],
        target_modules="all-linear", bias="none", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=params["MICRO_BATCH_SIZE"],
        gradient_accumulation_steps=params["BATCH_SIZE"] // params["MICRO_BATCH_SIZE"],
        num_train_epochs=params["EPOCHS"], learning_rate=params["LEARNING_RATE"], warmup_steps=params["WARMUP_STEPS"],
        lr_scheduler_type="cosine", weight_decay=0.0, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=loaded.device == "cpu", seed=42, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    output = trainer.train()
    model.eval()
    return {"real_tokens_per_epoch": sum(sum(r["attention_mask"]) for r in rows), "examples": len(rows),
            "steps": output.global_step}


def worker(recipe: str, data_file: Path, heldout_file: Path, params: dict) -> None:
    from common import load_reference_model

    time_trainer_train()
    loaded = load_reference_model()
    heldout = json.loads(heldout_file.read_text())
    before = heldout_losses(loaded.model, loaded.tokenizer, heldout, recipe)
    with tempfile.TemporaryDirectory() as tmp:
        figures = (run_ours if recipe == "ours" else run_seed)(loaded, data_file, params, Path(tmp) / recipe)
    seconds = TRAIN_SECONDS[-1]
    tokens = round(figures["real_tokens_per_epoch"] * params["EPOCHS"])
    figures.update(train_seconds=round(seconds, 2), real_tokens=tokens, tokens_per_s=tokens / seconds,
                   examples_per_s=figures["examples"] * params["EPOCHS"] / seconds, base_model=before,
                   heldout=heldout_losses(loaded.model, loaded.tokenizer, heldout, recipe),
                   peak_memory_mb=round(peak_memory_mb(loaded.device), 1))
    print("RESULT " + json.dumps(figures))


def run_recipe(recipe: str, data_file: Path, heldout_file: Path, params: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", recipe, "--data", str(data_file),
                           "--heldout-data", str(heldout_file), "--params", json.dumps(params)],
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{recipe} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=40, help="first N records of the catalog training data")
    parser.add_argument("--heldout", type=int, default=20, help="last N records, never trained on: the loss's data")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--worker", choices=("ours", "seed"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--heldout-data", help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, Path(args.data), Path(args.heldout_data), json.loads(args.params))
        return 0

    from llm_module.training.params import DEFAULTS

    params = {**{k: v for k, v in DEFAULTS.items() if k not in ("WARMUP_STEPS", "TARGET_MODULES")},
              "MICRO_BATCH_SIZE": 4, "BATCH_SIZE": 4, "EPOCHS": args.epochs, "CUTOFF_LEN": 256}
    everything = json.loads(DATA.read_text())
    heldout = everything[-args.heldout:]
    records = everything[: min(args.records, len(everything) - args.heldout)]
    with tempfile.TemporaryDirectory() as tmp:
        data_file, heldout_file = Path(tmp) / "catalog.json", Path(tmp) / "heldout.json"
        data_file.write_text(json.dumps(records))
        heldout_file.write_text(json.dumps(heldout))
        steps = int(-(-len(records) // params["MICRO_BATCH_SIZE"]) * params["EPOCHS"])
        params["WARMUP_STEPS"] = max(1, round(steps * 0.05))
        ours = run_recipe("ours", data_file, heldout_file, params)
        seed = run_recipe("seed", data_file, heldout_file, params)
    from common import machine

    report = {
        "load_average_end": os.getloadavg(), "machine": machine(),
        "records": len(records), "heldout_records": len(heldout), "params": params, "ours": ours, "seed": seed,
        "time_ratio_seed_over_ours": round(seed["train_seconds"] / ours["train_seconds"], 2),
        "tokens_per_s_ratio": round(ours["tokens_per_s"] / seed["tokens_per_s"], 2),
        "heldout_response_loss_ours_minus_seed": round(ours["heldout"]["response_loss"]
                                                       - seed["heldout"]["response_loss"], 4),
        "peak_memory_ratio": round(ours["peak_memory_mb"] / seed["peak_memory_mb"], 3),
        "reproduce": f"python bench/bench_training.py --records {args.records} --heldout {args.heldout} "
                     f"--epochs {args.epochs:g}",
    }
    print(f"same {len(records)} records, {params['EPOCHS']:g} epochs, {ours['steps']} vs {seed['steps']} steps: "
          f"Trainer.train {ours['train_seconds']:.1f} s (ours) vs {seed['train_seconds']:.1f} s (seed) = "
          f"{report['time_ratio_seed_over_ours']}x faster; real tokens/s {ours['tokens_per_s']:.0f} vs "
          f"{seed['tokens_per_s']:.0f}; held-out response loss {ours['heldout']['response_loss']:.3f} vs "
          f"{seed['heldout']['response_loss']:.3f} (base model {ours['base_model']['response_loss']:.3f} / "
          f"{seed['base_model']['response_loss']:.3f}); peak memory {ours['peak_memory_mb']:.0f} vs "
          f"{seed['peak_memory_mb']:.0f} MB", file=sys.stderr)
    print("RESULT " + json.dumps({"section": "training", **report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
