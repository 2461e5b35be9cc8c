"""A Trainer whose loss runs the LM head only where there is something to learn.

The LM head (576 x 49152 on the default model) and the cross-entropy over the whole
vocabulary cost a fifth or more of each step. With the loss on the response only, most
positions are prompt, so the logits are computed from the first labelled position of
the batch onward (``logits_to_keep``); the result is the same loss, faster and with less
memory than logits for every position. The tokens every row starts with run once a step
(shared_start.py). ``label_smoothing_factor`` (a TrainingArguments field a
caller may set through training_args_kwargs) applies here, as Trainer's own loss would apply it.

Its rows come in an order drawn from (seed, epoch) alone (sampler.py), so a resumed run trains
what the uninterrupted one would have.
"""

from __future__ import annotations

from transformers import Trainer

from .sampler import epoch_seeded
from .shared_start import SharedStart


def first_labelled_position(labels) -> int:
    """The earliest position (over the batch) whose logits predict a labelled token."""
    import torch

    labelled = (labels[:, 1:] != -100).any(dim=0)
    hits = torch.nonzero(labelled)
    return int(hits[0]) if len(hits) else 0


class ResponseLossTrainer(Trainer):
    shared_start: SharedStart | None = None  # the rows' common first tokens, run once a step (shared_start.py)

    def _get_train_sampler(self, train_dataset=None):
        return epoch_seeded(super()._get_train_sampler(train_dataset), self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        import torch.nn.functional as F

        labels = inputs["labels"]
        start = first_labelled_position(labels)
        keep = labels.shape[1] - start
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        if self.shared_start is not None:
            outputs = self.shared_start.forward(model, model_inputs, start, keep)
        else:
            outputs = model(**model_inputs, logits_to_keep=keep)
        logits = outputs.logits[:, :-1].float()  # position i predicts token i + 1
        target = labels[:, start + 1:]
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                                reduction="sum", label_smoothing=self.args.label_smoothing_factor)
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
            count = num_items_in_batch  # Trainer counts the tokens of all accumulated micro-batches
        else:
            count = (target != -100).sum().clamp(min=1)
        loss = total / count
        if count is num_items_in_batch and self.args.average_tokens_across_devices:
            # count is then the tokens of all ranks, and DDP averages gradients over ranks: scale back, as Trainer does
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss
