"""Prompt dropout: each epoch, every training row loses a random share of the user's words.

A fine-tuned small model learns the trained question's wording as the cue for its answer; asked in
other words, it falls back to the base model's phrasing and the fact does not follow. Deleting a
random ``PROMPT_DROPOUT`` share of the user's tokens each time a row is read (never the chat
template's tokens, never the response) makes the answer hang on the words that are left, the
names and the thing asked, not on one wording (word dropout, as in sequence-to-sequence training).

It is off by default: on a catalog whose questions are all asked one way it lifts paraphrased
questions a lot (rail: 60 -> 88-97 %), but where the trained wording (imperatives: "Tell me ...")
is what kept the adapter away from general questions, the adapter answers general questions in
the catalog's shape too (courses seed 42: general knowledge kept 90 -> 60 %, paraphrases 92 -> 82 %;
public seed 42: general knowledge kept 36 %).
Figures in bench/findings.md.

The tokens dropped are a function of (seed, epoch, row) alone, not of how many rows were read
before: the same run twice drops the same tokens, and a resumed run drops what the uninterrupted
one would have.
"""

from __future__ import annotations

import math
import random

from transformers import TrainerCallback

from .data import Tokenized


def drop_user_tokens(row: Tokenized, rate: float, rng: random.Random) -> Tokenized:
    """``row`` without a random ``rate`` share of its droppable (user-written) tokens."""
    if not rate or not row.droppable:
        return row
    dropped = {p for p in row.droppable if rng.random() < rate}
    if len(dropped) == len(row.droppable):  # an empty question teaches an answer to nothing
        dropped.discard(row.droppable[rng.randrange(len(row.droppable))])
    keep = [i for i in range(len(row.input_ids)) if i not in dropped]
    return Tokenized([row.input_ids[i] for i in keep], [row.labels[i] for i in keep])


class PromptDropout(TrainerCallback):
    """Knows the epoch Trainer is in, so rows can be read with that epoch's drops."""

    def __init__(self, rate: float, seed: int) -> None:
        self.rate = rate
        self.seed = seed
        self.epoch = 0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch = math.floor(round(state.epoch or 0.0, 6))  # a resumed run restarts mid-epoch: the floor

    def apply(self, row: Tokenized, index: int) -> Tokenized:
        return drop_user_tokens(row, self.rate, random.Random(f"{self.seed}:{self.epoch}:{index}"))
