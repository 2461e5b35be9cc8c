"""Beam search (``num_beams > 1``): the one generation that does not run as rows of the batch.

A beam search keeps ``num_beams`` hypotheses per prompt and reorders them at every step, which
the step loop's one-row-per-slot layout does not do; it is rare in serving (no OpenAI-style API
offers it). So it runs transformers' own ``model.generate`` as a call on the model's thread
between two steps of the batch (scheduler.call): the running rows wait while it runs.
"""

from __future__ import annotations

import contextlib

import torch

from ..runtime.lora_rows import BASE, can_stack, one_adapter
from .intake import Call
from .request import FINISH_LENGTH, FINISH_STOP, RowOutput

# The range beam search takes temperature and repetition_penalty in: transformers divides the logits by them in
# float32, where a smaller one overflows (and 0 * inf is a NaN); beyond it the answer is the same anyway.
BEAM_SCALE = (1e-4, 1e4)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` cut before the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i != -1), default=-1)
    return (text[:cut], True) if cut != -1 else (text, False)


@torch.inference_mode()
def beam_search(model, tokenizer, call: Call, adapters=None) -> list[RowOutput]:
    """Run ``call`` (num_beams > 1) with transformers' generate; one output per (prompt, sequence)."""
    request = call.request
    device = next(model.parameters()).device
    options = dict(call.beam_options or {})
    options.pop("max_length", None)
    options.pop("min_length", None)
    for key in ("temperature", "repetition_penalty"):  # transformers' warpers turn extreme ones into NaNs
        if key in options:
            options[key] = min(max(options[key], BEAM_SCALE[0]), BEAM_SCALE[1])
    outputs: list[RowOutput] = []
    names = adapters.names() if adapters is not None else []
    for ids, params in zip(request.prompts, request.params, strict=True):
        options.update(max_new_tokens=params.max_new_tokens, min_new_tokens=params.min_new_tokens)
        runner, extra = model, {}
        context = contextlib.nullcontext()
        if names and can_stack(model, names):
            context = one_adapter(model, request.adapter)
        elif names:
            runner, extra = adapters.peft_model, {"adapter_names": [request.adapter or BASE]}
        with context:
            out = runner.generate(input_ids=torch.tensor([ids], device=device), **options, **extra,
                                  num_return_sequences=request.num_sequences, eos_token_id=sorted(params.eos_ids),
                                  pad_token_id=tokenizer.pad_token_id)
        for sequence in out[:, len(ids):].tolist():
            ended = [i for i, t in enumerate(sequence) if t in params.eos_ids]
            tokens = sequence[: ended[0] + 1] if ended else sequence
            text, stopped = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), params.stop)
            reason = FINISH_STOP if ended or stopped else FINISH_LENGTH
            outputs.append(RowOutput(text, tokens, reason, len(ids)))
    return outputs
