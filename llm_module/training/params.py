"""training_params: the seed module's keys, our defaults, and guards against recipes that cannot learn.

The seed module's keys keep their meaning (gradient accumulation = BATCH_SIZE //
MICRO_BATCH_SIZE). Its defaults (BATCH_SIZE 128, LEARNING_RATE 2e-5, warmup 20 steps)
made one optimizer step per epoch at a learning rate that never left 0 on small data;
``plan_steps`` shrinks such combinations and says why in the result's warnings.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..adapter_files import unservable_reason
from ..errors import InvalidInput, suggest

# Chosen on the catalog benchmark (bench/catalog_accuracy.py, docs/training.md): facts are
# learned fastest by many small steps at a high LoRA learning rate on every linear layer.
DEFAULTS = {
    "MICRO_BATCH_SIZE": 4,
    "BATCH_SIZE": 4,
    "EPOCHS": 8,
    "LEARNING_RATE": 2e-3,
    "CUTOFF_LEN": 256,
    "LORA_R": 16,
    "LORA_ALPHA": 32,
    "LORA_DROPOUT": 0.0,  # dropout masks cost ~15 % of a CPU step (bench/findings.md)
    "PROMPT_DROPOUT": 0.0,  # share of the prompts' common words left out of each row: prompt_dropout.py (opt-in)
    "WEIGHT_DECAY": 1.0,  # AdamW's decoupled decay of the LoRA weights: what the data does not hold up fades
    "WARMUP_STEPS": None,  # None: WARMUP_FRACTION of the optimizer steps
    "TARGET_MODULES": "all-linear",
}
SEED_DEFAULTS = {"MICRO_BATCH_SIZE": 4, "BATCH_SIZE": 128, "EPOCHS": 2, "LEARNING_RATE": 2e-5, "CUTOFF_LEN": 256,
                 "LORA_R": 4, "LORA_ALPHA": 16, "LORA_DROPOUT": 0.05, "WARMUP_STEPS": 20, "PROMPT_DROPOUT": 0.0,
                 "WEIGHT_DECAY": 0.0}
WARMUP_FRACTION = 0.05
MIN_STEPS_PER_EPOCH = 4  # fewer optimizer steps than this per epoch learns little from small data
MAX_WARMUP_FRACTION = 0.2
LOW_LR_STEPS = 50  # below this many steps, a LoRA learning rate under LOW_LR barely moves the weights
LOW_LR = 1e-4

TRAIN_OPTIONS = ("lora_config_kwargs", "training_args_kwargs", "data_format", "val_set_size", "eval_file",
                 "prompt_template", "train_on_inputs", "seed", "check_forgetting", "replay", "base_dtype",
                 "protect_general")
BASE_DTYPES = ("auto", "float32", "bfloat16")  # how the training copy holds the frozen base (trainer.py)
DEFAULT_PROTECT_GENERAL = 0.99  # share of general inputs' energy the adapter is kept out of: protect.py
DEFAULT_REPLAY = 0  # general examples (with the base model's own answers) mixed into the data: general.py
RETAINED_TARGET = 0.9  # below this share of the base model's right general answers, the result warns


@dataclass
class TrainingParams:
    MICRO_BATCH_SIZE: int
    BATCH_SIZE: int
    EPOCHS: float
    LEARNING_RATE: float
    CUTOFF_LEN: int
    LORA_R: int
    LORA_ALPHA: float
    LORA_DROPOUT: float
    PROMPT_DROPOUT: float
    WEIGHT_DECAY: float
    WARMUP_STEPS: int | None
    TARGET_MODULES: str | list[str]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StepPlan:
    micro_batch: int
    accumulation: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    warnings: list[str]


def check_options(kwargs: dict, *, packed_base: bool = False) -> None:
    """Refuse keys llm.train does not know, naming the close ones, and LoRA settings the engine cannot serve
    (``packed_base``: the served base model's weights are packed, see adapter_files.unservable_reason)."""
    for key in kwargs:
        if key not in TRAIN_OPTIONS:
            raise InvalidInput(f"llm.train got an unknown option {key!r}.{suggest(key, TRAIN_OPTIONS)} "
                               f"It takes: data_file, output_dir, training_params, resume_from_checkpoint, "
                               f"adapter_name, background, show_progress, {', '.join(TRAIN_OPTIONS)}.")
    lora = kwargs.get("lora_config_kwargs")
    reason = unservable_reason(lora, packed_base=packed_base) if isinstance(lora, dict) else None
    if reason:  # refused now, not after a run whose adapter would not load
        raise InvalidInput(f"lora_config_kwargs: {reason} Leave that setting out to train a plain LoRA adapter "
                           "(llm.train's default), which the engine serves.")


def resolve_params(training_params: dict | None) -> TrainingParams:
    """Defaults overlaid with the caller's training_params, type-checked."""
    if training_params is None:
        training_params = {}
    if not isinstance(training_params, dict):
        raise InvalidInput(f"training_params must be an object such as {{\"EPOCHS\": 3}}, got {training_params!r}.")
    values = dict(DEFAULTS)
    for key, value in training_params.items():
        if key not in DEFAULTS:
            raise InvalidInput(f"training_params has an unknown key {key!r}.{suggest(key, DEFAULTS)} "
                               f"Known keys: {', '.join(DEFAULTS)}; other Trainer or LoRA settings go in "
                               "training_args_kwargs / lora_config_kwargs.")
        values[key] = value
    for key in ("MICRO_BATCH_SIZE", "BATCH_SIZE", "CUTOFF_LEN", "LORA_R"):
        values[key] = _positive(key, values[key], int)
    for key in ("EPOCHS", "LEARNING_RATE", "LORA_ALPHA"):
        values[key] = _positive(key, values[key], float)
    for key in ("LORA_DROPOUT", "PROMPT_DROPOUT"):
        share = values[key]
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
            raise InvalidInput(f"{key} must be a number in [0, 1) (0: off), got {share!r}.")
        values[key] = float(share)
    decay = values["WEIGHT_DECAY"]
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or decay < 0:
        raise InvalidInput(f"WEIGHT_DECAY must be a number >= 0 (0: off), got {decay!r}.")
    values["WEIGHT_DECAY"] = float(decay)
    if values["WARMUP_STEPS"] is not None:
        warmup = values["WARMUP_STEPS"]
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise InvalidInput(f"WARMUP_STEPS must be a whole number >= 0, got {warmup!r}.")
    targets = values["TARGET_MODULES"]
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise InvalidInput(f"TARGET_MODULES must be 'all-linear' or a list of module names, got {targets!r}.")
    return TrainingParams(**values)


def _positive(key: str, value, kind: type):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise InvalidInput(f"training_params {key} must be a positive number, got {value!r}.")
    if kind is int and value != int(value):
        raise InvalidInput(f"training_params {key} must be a whole number, got {value!r}.")
    return kind(value)


def plan_steps(params: TrainingParams, n_train: int, max_steps: int | None = None) -> StepPlan:
    """Batch sizes, accumulation and warmup that give small data enough optimizer steps.

    Each adjustment of what the caller asked for is explained in ``warnings``.
    """
    warnings: list[str] = []
    micro, batch = params.MICRO_BATCH_SIZE, params.BATCH_SIZE
    if micro > batch:
        warnings.append(f"MICRO_BATCH_SIZE {micro} is larger than BATCH_SIZE {batch}; used BATCH_SIZE {micro}.")
        batch = micro
    accumulation = max(1, batch // micro)
    if accumulation * micro != batch:
        warnings.append(f"BATCH_SIZE {batch} is not a multiple of MICRO_BATCH_SIZE {micro}; "
                        f"the effective batch is {accumulation * micro}.")
    micro_batches = math.ceil(n_train / micro)
    wanted = min(MIN_STEPS_PER_EPOCH, micro_batches)
    if micro_batches // accumulation < wanted:
        new_accumulation = max(1, micro_batches // wanted)
        warnings.append(
            f"BATCH_SIZE {accumulation * micro} is too large for {n_train} training examples: it gives "
            f"{max(1, micro_batches // accumulation)} optimizer step(s) per epoch. Used gradient accumulation "
            f"{new_accumulation} (effective batch {new_accumulation * micro}) for {micro_batches // new_accumulation} "
            "steps per epoch; lower BATCH_SIZE to choose yourself."
        )
        accumulation = new_accumulation
    steps_per_epoch = max(1, micro_batches // accumulation)
    total = max_steps if max_steps and max_steps > 0 else max(1, math.ceil(steps_per_epoch * params.EPOCHS))
    warmup = params.WARMUP_STEPS if params.WARMUP_STEPS is not None else round(total * WARMUP_FRACTION)
    if warmup > total * MAX_WARMUP_FRACTION:
        capped = int(total * MAX_WARMUP_FRACTION)
        warnings.append(f"WARMUP_STEPS {warmup} is over {int(MAX_WARMUP_FRACTION * 100)}% of the {total} optimizer "
                        f"steps, so the learning rate would barely leave 0; used {capped} warmup steps.")
        warmup = capped
    if total < LOW_LR_STEPS and params.LEARNING_RATE < LOW_LR:
        warnings.append(f"LEARNING_RATE {params.LEARNING_RATE:g} over only {total} optimizer steps will barely change "
                        f"the model; raise LEARNING_RATE (LoRA learns well at 1e-3) or EPOCHS.")
    return StepPlan(micro, accumulation, steps_per_epoch, total, warmup, warnings)
