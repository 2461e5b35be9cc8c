"""Training that does not forget: the adapter is kept out of the directions general requests use.

A LoRA layer adds ``B A x`` to a linear layer's output. Before the LoRA layers go in, the plain
model reads general prompts (``calibration_questions.json`` and ``replay_prompts.json``, none of
them a question of the forgetting check); for every linear layer the inputs' second moment
``C = sum x x^T`` is collected and its top eigenvectors ``U``, the directions that hold
``protect_general`` (e.g. 0.99) of the inputs' energy, are kept. Every ``lora_A`` is then held in
the orthogonal complement of ``U`` (at the start, every ``PROJECT_EVERY`` optimizer steps and at
the end), so ``A x`` is ~0 for inputs like the general ones: the model answers general requests as
the base does, and the catalog is learned through the directions general requests do not use
(null-space constrained updates, as in AlphaEdit, ICLR 2025). Figures: bench/findings.md.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from ..errors import InvalidInput
from ..prompts import render_prompt
from .data import PaddingCollator, Tokenized
from .general import base_identity
from .shared_start import shared_start

PROMPT_FILES = (Path(__file__).with_name("calibration_questions.json"), Path(__file__).with_name("replay_prompts.json"))
BATCH_SIZE = 16
MAX_PROTECTED = 0.75  # of a layer's input dimensions: where general inputs spread over nearly all of them (random
# or very isotropic models), a quarter stays free, or the adapter could not learn at all (the default model: <= 0.67)
PROJECT_EVERY = 2  # optimizer steps between projections: A drifts for one step; each projection costs ~55 ms
# The subspaces depend on the base model alone: the last one's are kept for the process (~80 MB for the default
# model), so its next run skips the 15-20 s of measuring them (bench/findings.md).
_kept: dict[tuple, dict] = {}
_kept_lock = threading.Lock()


def check_share(value) -> float:
    """The share of general input energy to protect: 0 (off) up to, not including, 1."""
    if value is True:
        from .params import DEFAULT_PROTECT_GENERAL

        return DEFAULT_PROTECT_GENERAL
    if value is False or value is None:
        return 0.0
    if isinstance(value, (int, float)) and 0 <= value < 1:
        return float(value)
    raise InvalidInput(f"protect_general must be a share of general input energy in [0, 1) (0.99 keeps the adapter "
                       f"out of the directions holding 99 % of it; 0 or false: off), got {value!r}.")


def general_prompts(tokenizer, template: str) -> list[str]:
    prompts: list[str] = []
    for path in PROMPT_FILES:
        prompts += json.loads(path.read_text(encoding="utf-8"))
    return [render_prompt(tokenizer, [{"role": "user", "content": p}], template) for p in prompts]


def input_subspaces(model, tokenizer, texts: list[str], share: float) -> dict:
    """{linear module name: (basis, inside)}: the plain model's inputs to each linear layer on ``texts``,
    reduced to the cheaper of two equal descriptions of the protected subspace: its own basis U
    (``inside`` True) or the basis of its complement."""
    import torch

    moments = _input_moments(model, tokenizer, texts)
    bases = {}
    for moment in moments.values():
        if id(moment) not in bases:
            values, vectors = torch.linalg.eigh(moment)
            values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
            k = min(int((values.cumsum(0) / values.sum() < share).sum()) + 1, int(MAX_PROTECTED * len(values)))
            inside = k <= vectors.shape[1] - k
            bases[id(moment)] = ((vectors[:, :k] if inside else vectors[:, k:]).contiguous(), inside)
    return {name: bases[id(moment)] for name, moment in moments.items()}


def _input_moments(model, tokenizer, texts: list[str]) -> dict:
    """{linear module name: sum of x x^T over the inputs it read}; layers that read one tensor (q/k/v,
    gate/up) share one matrix."""
    import torch

    moments: dict[str, torch.Tensor] = {}
    state: dict = {"counted": None, "weight": 1.0, "read": {}}

    def record(name):
        def hook(module, args):
            x = args[0]
            earlier = state["read"].get(id(x))
            if earlier is not None and earlier[0] is x:  # the same tensor as a sibling layer's
                moments[name] = moments[earlier[1]]
                return
            state["read"][id(x)] = (x, name)  # holding x keeps its id from being reused in this forward
            flat = x.reshape(-1, x.shape[-1])
            if state["counted"] is not None:
                flat = flat[state["counted"]]
            flat = flat.float()
            moment = torch.mm(flat.T, flat).mul_(state["weight"])
            if name in moments:
                moments[name] += moment
            else:
                moments[name] = moment
        return hook

    handles = [module.register_forward_pre_hook(record(name)) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and "lm_head" not in name]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    prefix = shared_start(rows)
    body = model.get_decoder() if hasattr(model, "get_decoder") else model  # the hooks read no logits: skip the head
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if prefix:  # the chat template's system turn: the same activations in every row, read once, counted for all
                state["weight"] = float(len(rows))
                body(input_ids=torch.tensor([rows[0][:prefix]]))
                state.update(weight=1.0, read={})
            order = sorted(rows, key=len)
            pad = PaddingCollator(tokenizer.pad_token_id or 0, multiple_of=1)
            for start in range(0, len(order), BATCH_SIZE):
                batch = pad([Tokenized(row, row) for row in order[start:start + BATCH_SIZE]])
                counted = batch["attention_mask"].bool()
                counted[:, :prefix] = False
                state["counted"] = counted.reshape(-1)
                body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                state["read"] = {}
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return moments


class GeneralSubspaceGuard(TrainerCallback):
    """Holds every lora_A out of its layer's protected subspace while Trainer runs."""

    def __init__(self, peft_model, subspaces: dict) -> None:
        self.layers = []
        for name, module in peft_model.named_modules():
            lora_a = getattr(module, "lora_A", None)
            key = name.removeprefix("base_model.model.")
            if lora_a is not None and "default" in lora_a and key in subspaces:
                weight = lora_a["default"].weight
                basis, inside = subspaces[key]
                self.layers.append((weight, basis.to(weight.device, weight.dtype), inside))

    def project(self) -> None:
        import torch

        with torch.no_grad():
            for weight, basis, inside in self.layers:
                part = (weight @ basis) @ basis.T
                if inside:
                    weight -= part  # A - (A U) U^T
                else:
                    weight.copy_(part)  # (A V) V^T, V the complement's basis: the same matrix

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:  # a resumed run's weights are the checkpoint's, projected as the run left them
            self.project()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % PROJECT_EVERY == 0:
            self.project()

    def on_train_end(self, args, state, control, **kwargs):
        self.project()


def general_subspaces(model, tokenizer, template: str, share: float) -> tuple[dict, dict]:
    """The protected subspaces of the plain model's linear layers, and what making them took."""
    start = time.perf_counter()
    texts = general_prompts(tokenizer, template)
    identity = base_identity(model)
    key = (identity, str(model.dtype), str(getattr(model.config, "_attn_implementation", "")), share, tuple(texts))
    with _kept_lock:
        subspaces = _kept.get(key) if identity else None
    reused = subspaces is not None
    if subspaces is None:
        subspaces = input_subspaces(model, tokenizer, texts, share)
        if identity:
            with _kept_lock:
                _kept.clear()
                _kept[key] = subspaces
    dims = [basis.shape[1] if inside else basis.shape[0] - basis.shape[1] for basis, inside in subspaces.values()]
    return subspaces, {"prompts": len(texts), "layers": len(subspaces), "protected_dims_min": min(dims, default=0),
                       "protected_dims_max": max(dims, default=0), "reused": reused,
                       "seconds": round(time.perf_counter() - start, 1)}
