"""Loss and perplexity of a model (base or one adapter) on a data file.

The loss is the mean over every labelled token (not a mean of batch means), taken on
the responses only by default, exactly as training takes it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from ..errors import InvalidInput, suggest
from ..runtime.lora_rows import BASE
from .data import PaddingCollator, Tokenized, load_examples
from .params import DEFAULTS

EVALUATE_OPTIONS = ("batch_size", "cutoff_len", "data_format", "prompt_template", "train_on_inputs")


def token_loss(model, rows: list[Tokenized], *, pad_id: int, batch_size: int = 8,
               adapter: str | None = None, multi_adapter: bool = False) -> tuple[float, int]:
    """(summed cross-entropy, labelled tokens) of ``rows``; the model's train/eval mode is left as it was."""
    import torch
    import torch.nn.functional as F

    collate = PaddingCollator(pad_id, multiple_of=1)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    ordered = sorted(rows, key=len)  # similar lengths together: little padding
    try:
        with torch.inference_mode():
            for start in range(0, len(ordered), batch_size):
                batch = {k: v.to(device) for k, v in collate(ordered[start:start + batch_size]).items()}
                labels = batch.pop("labels")
                extra = {"adapter_names": [adapter or BASE] * labels.shape[0]} if multi_adapter else {}
                logits = model(**batch, **extra).logits[:, :-1].float()
                target = labels[:, 1:]
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                         ignore_index=-100, reduction="sum").item()
                tokens += int((target != -100).sum())
    finally:
        model.train(was_training)
    return total, tokens


def summarize(total: float, tokens: int) -> dict:
    loss = total / tokens if tokens else None
    return {"loss": round(loss, 5) if loss is not None else None,
            "perplexity": round(math.exp(min(loss, 50.0)), 4) if loss is not None else None,
            "tokens": tokens}


def evaluate_model(model, tokenizer, *, data_file: Path, adapter: str | None, **kwargs) -> dict:
    """Loss, perplexity, labelled token count and record count of ``model`` (with ``adapter``) on ``data_file``."""
    from peft import PeftModel

    for key in kwargs:
        if key not in EVALUATE_OPTIONS:
            raise InvalidInput(f"llm.evaluate got an unknown option {key!r}.{suggest(key, EVALUATE_OPTIONS)} "
                               f"It takes: data_file, adapter, {', '.join(EVALUATE_OPTIONS)}.")
    batch_size = kwargs.get("batch_size", 8)
    cutoff_len = kwargs.get("cutoff_len", DEFAULTS["CUTOFF_LEN"])
    for name, value in (("batch_size", batch_size), ("cutoff_len", cutoff_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInput(f"{name} must be a whole number >= 1, got {value!r}.")
    start = time.perf_counter()
    rows, summary = load_examples(data_file, tokenizer, data_format=kwargs.get("data_format"),
                                  prompt_template=kwargs.get("prompt_template"), cutoff_len=cutoff_len,
                                  train_on_inputs=bool(kwargs.get("train_on_inputs", False)))
    total, tokens = token_loss(model, rows, pad_id=tokenizer.pad_token_id, batch_size=batch_size, adapter=adapter,
                               multi_adapter=isinstance(model, PeftModel))
    return {**summarize(total, tokens), "records": summary["records"], "examples": summary["examples"],
            "data_format": summary["data_format"], "prompt_template": summary["prompt_template"],
            "seconds": round(time.perf_counter() - start, 3)}
