"""One LoRA training run: data, LoRA model, Trainer, checkpoints, final adapter and report."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..adapter_files import META_FILE
from ..errors import InvalidInput, suggest
from ..paths import atomic_dir, atomic_write_text
from .callbacks import RunMonitor
from .checkpoints import resume_point
from .data import PaddingCollator, Tokenized, load_examples, tokenize_examples
from .evaluate import summarize, token_loss
from .general import base_scores, forgetting_warning, general_check, replay_examples
from .loss import ResponseLossTrainer
from .params import (
    BASE_DTYPES,
    DEFAULT_PROTECT_GENERAL,
    DEFAULT_REPLAY,
    RETAINED_TARGET,
    StepPlan,
    TrainingParams,
    check_options,
    plan_steps,
    resolve_params,
)
from .prompt_dropout import PromptDropout, keep_names
from .protect import GeneralSubspaceGuard, check_share, general_subspaces
from .provenance import base_provenance
from .report import write_loss_curve, write_training_log
from .shared_start import SharedStart, shared_start

log = logging.getLogger(__name__)


class _Rows:
    """The tokenized examples as the dict rows Trainer and its length grouping read (training rows with
    this epoch's prompt dropout)."""

    def __init__(self, rows: list[Tokenized], dropout: PromptDropout | None = None) -> None:
        self.rows = rows
        self.dropout = dropout

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.dropout.apply(self.rows[i], i) if self.dropout else self.rows[i]
        return {"input_ids": row.input_ids, "labels": row.labels}


def train_adapter(model, tokenizer, *, data_file: Path, output_dir: Path, training_params: dict | None,
                  resume_from_checkpoint: bool | str, progress: Callable[[dict], None], cancel: threading.Event,
                  base_model_name: str, show_progress: bool = True, **kwargs) -> dict:
    """LoRA-train ``model`` (a private copy of the base) on ``data_file``; write ``output_dir/final``."""
    check_options(kwargs)
    params = resolve_params(training_params)
    seed = _seed(kwargs.get("seed", 42))
    protect_share = check_share(kwargs.get("protect_general", DEFAULT_PROTECT_GENERAL))  # refused before any work
    progress({"state": "preparing"})
    base_dtype = _cast_frozen_base(model, kwargs.get("base_dtype", "auto"))  # before replay answers and base scores
    attention, cpu_bf16 = _set_up_cpu_compute(model)  # eager attention from here on; autocast while Trainer runs
    train_rows, eval_rows, data_summary = _datasets(tokenizer, data_file, params, kwargs, seed)
    data_summary.update(base_dtype=base_dtype, autocast="bfloat16" if cpu_bf16 else None, attention=attention)
    template = "auto" if data_summary["prompt_template"] == "none" else data_summary["prompt_template"]
    replay = _replay_count(kwargs.get("replay", DEFAULT_REPLAY))
    if replay and data_summary["data_format"] != "text" and not cancel.is_set():
        progress({"state": "preparing general examples"})
        train_rows = train_rows + _replay_rows(model, tokenizer, template, replay, seed, params)
    data_summary["replay_examples"] = len(train_rows) - data_summary["train_examples"]
    if params.PROMPT_DROPOUT:  # only the words many prompts share may be dropped, never the names
        train_rows = keep_names(train_rows)
        data_summary["prompt_dropout_tokens"] = len({r.input_ids[p] for r in train_rows for p in r.droppable})
    max_steps = (kwargs.get("training_args_kwargs") or {}).get("max_steps")
    plan = plan_steps(params, len(train_rows), max_steps if isinstance(max_steps, int) else None)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint, resume_warnings = resume_point(output_dir, resume_from_checkpoint)
    warnings = plan.warnings + resume_warnings + _data_warnings(data_summary, params, eval_rows)
    if cancel.is_set():
        return {"cancelled": True, "steps": 0, "warnings": warnings, "adapter_dir": None}

    check = _flag("check_forgetting", kwargs, True) and os.environ.get("RANK", "0") == "0"  # rank 0 alone checks
    base_general = _base_scores(model, tokenizer, template) if check else None
    protected = _protected_subspaces(model, tokenizer, template, protect_share, data_summary, progress)
    peft_model = _lora_model(model, params, kwargs.get("lora_config_kwargs"), seed)
    monitor = RunMonitor(progress, cancel)
    trainer = _trainer(peft_model, tokenizer, output_dir, params, plan, train_rows, eval_rows, monitor,
                       kwargs.get("training_args_kwargs"), seed, show_progress, cpu_bf16)
    if protected:
        trainer.add_callback(GeneralSubspaceGuard(peft_model, protected))
        del protected  # the guard holds what it needs
    from peft.helpers import disable_input_dtype_casting

    with disable_input_dtype_casting(peft_model, active=cpu_bf16):  # autocast gives LoRA bf16 inputs as they are
        train_output = trainer.train(resume_from_checkpoint=checkpoint)
    peft_model.eval()
    data_summary["shared_start_tokens"] = trainer.shared_start.tokens_run_once
    state = trainer.state
    result = {
        "cancelled": monitor.cancelled,
        "steps": state.global_step,
        "total_steps": state.max_steps,
        "epochs": round(float(state.epoch or 0), 3),
        "train_loss": _recent_loss(state.log_history, plan.steps_per_epoch),
        "train_loss_mean": round(float(train_output.training_loss), 5),
        "train_tokens": monitor.tokens_seen(state),
        "tokens_per_s": round(monitor.tokens_per_s(state), 1),
        "seconds": round(monitor.seconds, 2),
        "resumed_from": checkpoint,
        "started_at_step": monitor.start_step,  # this process's first step was the next one: nothing trained twice
        "params": {**params.to_dict(), "gradient_accumulation": plan.accumulation, "warmup_steps": plan.warmup_steps,
                   "seed": seed, **data_summary},
        "warnings": warnings,
        "adapter_dir": None,
    }
    if not trainer.is_world_process_zero():  # distributed run: rank 0 alone evaluates and writes log and final/
        return result
    if eval_rows and not monitor.cancelled:
        progress({"state": "evaluating"})
        total, tokens = token_loss(peft_model, eval_rows, pad_id=tokenizer.pad_token_id,
                                   batch_size=params.MICRO_BATCH_SIZE)
        evaluation = summarize(total, tokens)
        result.update(eval_loss=evaluation["loss"], perplexity=evaluation["perplexity"], eval_tokens=tokens)
    else:
        result.update(eval_loss=None, perplexity=None)
    result.update(general=None, general_retained=None)
    if base_general is not None and not monitor.cancelled:
        progress({"state": "checking general knowledge"})
        result["general"] = _general_check(peft_model, tokenizer, base_general)
        result["general_retained"] = (result["general"] or {}).get("retained")
        warning = forgetting_warning(result["general"] or {}, RETAINED_TARGET)
        if warning:
            result["warnings"].append(warning)
    write_training_log(output_dir / "training_log.json", state.log_history, result)
    write_loss_curve(output_dir / "loss_curve.png", state.log_history, title=f"{output_dir.name}: LoRA training")
    if monitor.cancelled:
        progress({"state": "cancelled"})
        return result
    progress({"state": "saving"})
    result["adapter_dir"] = str(_save_final(peft_model, output_dir, data_file, base_model_name, result))
    progress({"state": "done"})
    return result


def _cast_frozen_base(model, choice) -> str:
    """Store the frozen base weights of the training copy in bfloat16 where the CPU multiplies bf16 natively.

    LoRA trains only its own small matrices (peft keeps them float32), so the base weights are read,
    never updated: bf16 halves what each matmul reads and runs it on the CPU's bf16 dot-product
    instructions (a catalog step 1.14x faster on AVX512-BF16, bench/findings.md). The caller's choice wins;
    "auto" keeps float32 on CPUs without bf16 arithmetic and leaves CUDA to Trainer's bf16 autocast.
    """
    import torch

    if choice not in BASE_DTYPES:
        raise InvalidInput(f"base_dtype must be one of {', '.join(BASE_DTYPES)}, got {choice!r}.")
    if choice == "auto":
        on_cpu = next(model.parameters()).device.type == "cpu"
        has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        choice = "bfloat16" if on_cpu and has_bf16 and model.dtype == torch.float32 else "keep"
    if choice != "keep":
        model.to(getattr(torch, choice))
    return str(model.dtype).replace("torch.", "")


def _set_up_cpu_compute(model) -> tuple[str, bool]:
    """On CPU, switch the private training copy to eager attention; say which attention it trains with and
    whether it trains under bf16 autocast (a bf16 base: ``_training_arguments``, with peft's input casting
    off in ``train_adapter``).

    SDPA's backward is slow on CPU: 3.25 vs 0.93 ms a layer in bf16; a float32 catalog step 1.56 -> 1.43 s
    on an AVX2 CPU. peft keeps LoRA's weights float32 and, by default, casts each LoRA layer's bf16 input
    to float32 and its output back: activation-sized copies in all 210 layers, a fifth of a bf16 step.
    Under autocast only LoRA's small weights are cast to bf16 (the optimizer still updates float32
    weights): a bf16 step 1.25 -> 1.02 s with eager attention. Figures: bench/findings.md.
    """
    import torch

    first = next(model.parameters())
    if first.device.type != "cpu":
        return str(model.config._attn_implementation), False
    model.set_attn_implementation("eager")  # the private training copy only: serving keeps its own
    return "eager", first.dtype == torch.bfloat16


def _seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidInput(f"seed must be an integer, got {seed!r}.")
    return seed


def _datasets(tokenizer, data_file: Path, params: TrainingParams, kwargs: dict, seed: int):
    options = {"data_format": kwargs.get("data_format"), "prompt_template": kwargs.get("prompt_template"),
               "cutoff_len": params.CUTOFF_LEN, "train_on_inputs": _flag("train_on_inputs", kwargs, False)}
    rows, summary = load_examples(data_file, tokenizer, **options)
    eval_file, val_set_size = kwargs.get("eval_file"), kwargs.get("val_set_size")
    if eval_file and val_set_size:
        raise InvalidInput("Pass either eval_file or val_set_size, not both.")
    eval_rows: list[Tokenized] = []
    if eval_file:
        eval_path = Path(str(eval_file)).expanduser()
        if not eval_path.is_absolute():
            eval_path = data_file.parent / eval_path
        if not eval_path.is_file():
            raise InvalidInput(f"eval_file {eval_file!r} does not exist (looked at {str(eval_path)!r}).")
        eval_rows, _ = load_examples(eval_path, tokenizer, **options)
    elif val_set_size:
        count = _val_count(val_set_size, len(rows))
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        eval_rows, rows = shuffled[:count], shuffled[count:]
    summary.update(train_examples=len(rows), eval_examples=len(eval_rows))
    return rows, eval_rows, summary


def _flag(key: str, kwargs: dict, default: bool) -> bool:
    value = kwargs.get(key, default)
    if not isinstance(value, bool):
        raise InvalidInput(f"{key} must be true or false, got {value!r}.")
    return value


def _val_count(val_set_size, n: int) -> int:
    if isinstance(val_set_size, bool) or not isinstance(val_set_size, (int, float)) or val_set_size < 0:
        raise InvalidInput(f"val_set_size must be a count or a fraction in (0, 1), got {val_set_size!r}.")
    count = round(n * val_set_size) if val_set_size < 1 else int(val_set_size)
    if count < 1 or count >= n:
        raise InvalidInput(f"val_set_size {val_set_size!r} leaves {n - count} of {n} examples to train on; "
                           "use a smaller count or fraction.")
    return count


def _data_warnings(summary: dict, params: TrainingParams, eval_rows: list) -> list[str]:
    warnings = []
    if summary["truncated"]:
        warnings.append(f"{summary['truncated']} example(s) were longer than CUTOFF_LEN={params.CUTOFF_LEN} tokens "
                        "and were cut; raise CUTOFF_LEN to keep them whole.")
    if summary["dropped"]:
        warnings.append(f"{summary['dropped']} example(s) were dropped: their prompt alone fills CUTOFF_LEN.")
    if not eval_rows:
        warnings.append("No evaluation set: eval_loss and perplexity are null; pass val_set_size or eval_file.")
    return warnings


def _lora_model(model, params: TrainingParams, overrides: dict | None, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    settings = {"r": params.LORA_R, "lora_alpha": params.LORA_ALPHA, "lora_dropout": params.LORA_DROPOUT,
                "target_modules": params.TARGET_MODULES, "bias": "none", "task_type": "CAUSAL_LM"}
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    settings.update(_checked_overrides("lora_config_kwargs", overrides, known))
    try:
        config = LoraConfig(**settings)
        set_seed(seed)  # lora_A's random init draws from the global generator: seed it, or no two runs agree
        return get_peft_model(model, config)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"The LoRA settings were not accepted: {exc}") from exc


def _checked_overrides(what: str, overrides: dict | None, known: set[str]) -> dict:
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise InvalidInput(f"{what} must be an object of keyword arguments, got {overrides!r}.")
    for key in overrides:
        if key not in known:
            raise InvalidInput(f"{what} has an unknown key {key!r}.{suggest(key, known)}")
    return dict(overrides)


def _training_arguments(output_dir: Path, params: TrainingParams, plan: StepPlan, has_eval: bool, seed: int,
                        show_progress: bool, on_cuda: bool, cpu_bf16: bool, overrides: dict | None):
    from transformers import TrainingArguments

    settings = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": plan.micro_batch,
        "per_device_eval_batch_size": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "num_train_epochs": params.EPOCHS,
        "learning_rate": params.LEARNING_RATE,
        "warmup_steps": plan.warmup_steps,
        "lr_scheduler_type": "cosine",
        "weight_decay": params.WEIGHT_DECAY,
        "logging_steps": 1,
        "save_strategy": "epoch",
        "save_total_limit": 2,
        "eval_strategy": "epoch" if has_eval else "no",
        "report_to": "none",
        "disable_tqdm": not show_progress,
        "remove_unused_columns": False,
        "train_sampling_strategy": "group_by_length",  # batches of similar length: little padding
        "include_num_input_tokens_seen": "non_padding",
        "bf16": on_cuda or cpu_bf16,  # autocast; on CPU only over a bf16 base (autocast would cast its weights)
        "use_cpu": not on_cuda,
        "gradient_checkpointing": False,  # small LoRA runs fit in memory; recomputation only costs time
        "seed": seed,
        "dataloader_num_workers": 0,
        "save_safetensors": True,
    }
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    settings = {k: v for k, v in settings.items() if k in known}
    settings.update(_checked_overrides("training_args_kwargs", overrides, known))
    try:
        return TrainingArguments(**settings)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"The Trainer settings were not accepted: {exc}") from exc


def _trainer(peft_model, tokenizer, output_dir: Path, params: TrainingParams, plan: StepPlan, train_rows, eval_rows,
             monitor: RunMonitor, overrides: dict | None, seed: int, show_progress: bool, cpu_bf16: bool):
    from transformers import PrinterCallback

    on_cuda = next(peft_model.parameters()).device.type == "cuda"
    args = _training_arguments(output_dir, params, plan, bool(eval_rows), seed, show_progress, on_cuda, cpu_bf16,
                               overrides)
    dropout = PromptDropout(params.PROMPT_DROPOUT, seed) if params.PROMPT_DROPOUT else None
    trainer = ResponseLossTrainer(
        model=peft_model,
        args=args,
        train_dataset=_Rows(train_rows, dropout),
        eval_dataset=_Rows(eval_rows) if eval_rows else None,
        data_collator=PaddingCollator(tokenizer.pad_token_id, multiple_of=8 if on_cuda else 1),
        processing_class=tokenizer,
        callbacks=[monitor] + ([dropout] if dropout else []),
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict when the progress bar is off
    trainer.shared_start = SharedStart(shared_start([row.input_ids for row in train_rows]))
    return trainer


def _replay_count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"replay must be a whole number of general examples >= 0 (0: none), got {value!r}.")
    return value


def _replay_rows(model, tokenizer, template: str, count: int, seed: int, params: TrainingParams) -> list[Tokenized]:
    """General prompts with the base model's own answers (general.py), tokenized like the data."""
    examples = replay_examples(model, tokenizer, template=template, count=count, seed=seed)
    rows, _ = tokenize_examples(examples, tokenizer, cutoff_len=params.CUTOFF_LEN, train_on_inputs=False,
                                chunk_text=False)
    return rows


def _protected_subspaces(model, tokenizer, template: str, share: float, data_summary: dict,
                         progress) -> dict | None:
    """What the adapter is kept out of (protect.py), measured on the plain model; None when off."""
    data_summary["protect_general"] = share
    if not share:
        return None
    progress({"state": "measuring general inputs"})
    subspaces, info = general_subspaces(model, tokenizer, template, share)
    data_summary.update(protect_seconds=info["seconds"], protect_reused=info["reused"],
                        protected_dims=[info["protected_dims_min"], info["protected_dims_max"]])
    log.info("Protected general subspaces: %s", info)
    if not subspaces:  # e.g. GPT-2's Conv1D layers: nothing the guard knows how to measure
        log.warning("protect_general: this model has no nn.Linear layers to protect; training without the guard.")
    return subspaces or None


def _base_scores(model, tokenizer, template: str) -> dict | None:
    """The base model's side of the forgetting guard (general.py), before the LoRA layers go in."""
    try:
        return base_scores(model, tokenizer, template=template)
    except Exception as exc:  # a check must never stop a run
        log.warning("The general-knowledge check did not run: %s: %s", type(exc).__name__, exc)
        return None


def _general_check(peft_model, tokenizer, base: dict) -> dict | None:
    """The adapter's side of the forgetting guard; None when it cannot run (logged)."""
    try:
        return general_check(peft_model, tokenizer, base)
    except Exception as exc:  # a check must never lose the adapter that was just trained
        log.warning("The general-knowledge check did not run: %s: %s", type(exc).__name__, exc)
        return None


def _recent_loss(log_history: list[dict], window: int) -> float | None:
    """Mean training loss over the last ``window`` logged steps (the last epoch by default)."""
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    if not losses:
        return None
    recent = losses[-max(1, window):]
    value = sum(recent) / len(recent)
    return round(value, 5) if math.isfinite(value) else None


def _save_final(peft_model, output_dir: Path, data_file: Path, base_model_name: str, result: dict) -> Path:
    """Write the adapter and its meta beside it in one rename: a half-written final never exists."""
    final = output_dir / "final"
    provenance = base_provenance(peft_model.get_base_model(), base_model_name)
    for config in peft_model.peft_config.values():  # adapter_config.json names the base as users know it
        config.base_model_name_or_path = provenance["base_model_id"]
    meta = {
        "base_model": base_model_name,
        "base_model_id": provenance["base_model_id"],
        "base_source": provenance["source"],
        "trained_at": time.time(),
        "data_file": str(data_file),
        "params": result["params"],
        "prompt_template": result["params"].get("prompt_template"),
        "steps": result["steps"],
        "train_loss": result["train_loss"],
        "eval_loss": result["eval_loss"],
        "general_retained": result.get("general_retained"),
    }
    with atomic_dir(final) as tmp:
        peft_model.save_pretrained(str(tmp))
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=1))
    return final
