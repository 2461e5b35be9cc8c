"""The tokens every training row starts with, run once a step, without a gradient.

Every row of a chat-format dataset begins with the same tokens: the chat template's system turn and
the opening of the user's turn (24 of ~55 tokens a row on the default model). Trainer would run them,
forward and backward, once per row. Here a step runs them once, as a batch of one under ``no_grad``,
and every row continues from their keys and values. The logits are the same as the full forward's
(to float rounding); the step is ~1.2x faster on a CPU (bench/findings.md). The adapter still acts on
the shared start in the forward, as it does when served (the serving prefix cache is kept per
adapter); what the gradient leaves out is the one path through which a change to how the adapter
reads the system turn would reach every answer, general ones included.

The first step compares the two forwards once (no_grad): a model family whose cache or masks do
not continue a batch from a shared start (a layout this module does not know) falls back to the
full forward for the rest of the run instead of training on wrong logits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)

MIN_SHARED = 8  # a start of a few tokens saves too little to pay for a second forward call (not measured)
AGREEMENT = 1e-2  # largest logit difference, as a share of the largest logit, that still counts as the same


def shared_start(rows: Sequence[Sequence[int]]) -> int:
    """How many leading token ids all ``rows`` have in common."""
    if not rows:
        return 0
    first = rows[0]
    length = min(len(row) for row in rows)
    for row in rows[1:]:
        length = next((i for i in range(length) if row[i] != first[i]), length)
    return length


class SharedStart:
    """Runs a batch's shared start once; the rows' forward continues from its keys and values."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.checked = False

    @property
    def tokens_run_once(self) -> int:
        """The shared start's length where a step ran it once; 0 where every row ran in full."""
        return self.length if self.checked else 0

    def forward(self, model, inputs: dict, start: int, keep: int):
        """The model's output for ``inputs`` with logits for the last ``keep`` positions."""
        shared = min(self.length, start)  # the first labelled logit must be computed with a gradient
        ids = inputs["input_ids"]
        if shared < MIN_SHARED or not bool((ids[:, :shared] == ids[:1, :shared]).all()):
            return model(**inputs, logits_to_keep=keep)
        if not self.checked:
            self._check(model, inputs, shared, keep)
            if not self.length:
                return model(**inputs, logits_to_keep=keep)
        return self._continue(model, inputs, shared, keep)

    def _continue(self, model, inputs: dict, shared: int, keep: int):
        import torch
        from transformers import DynamicCache

        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        cache = DynamicCache(config=_config(model))
        with torch.no_grad():
            model(input_ids=ids[:1, :shared], past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(ids.shape[0])
        positions = torch.arange(shared, ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        return model(input_ids=ids[:, shared:], attention_mask=mask, position_ids=positions,
                     past_key_values=cache, use_cache=True, logits_to_keep=keep)

    def _check(self, model, inputs: dict, shared: int, keep: int) -> None:
        import torch

        self.checked = True
        with torch.no_grad():
            full = model(**inputs, logits_to_keep=keep).logits.float()
            continued = self._continue(model, inputs, shared, keep).logits.float()
        real = inputs["attention_mask"][:, -keep:].bool()  # padding's logits are never read
        full, continued = full[real], continued[real]
        gap = float((full - continued).abs().max()) / max(float(full.abs().max()), 1e-6)
        if gap > AGREEMENT:
            log.warning("Running the rows' shared start once changed the logits (%.3g of their size) on this "
                        "model; training runs every row in full instead.", gap)
            self.length = 0


def _config(model):
    while hasattr(model, "module"):  # DistributedDataParallel
        model = model.module
    return model.config
