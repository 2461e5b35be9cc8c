"""The order rows are trained in: batches of similar length, shuffled by (seed, epoch) alone.

Trainer's ``group_by_length`` sampler draws each epoch's order from torch's global generator
when the epoch's iterator starts. A run resumed mid-epoch starts that iterator before Trainer
restores the checkpoint's generator state, so it trained the rest of the epoch in another order
than the run it resumed (a tiny-model run resumed at step 5 of 12 differed from step 6 on;
resumed at an epoch boundary it was bit-identical). Seeding each epoch's draw from (seed, epoch)
makes the order the same however the run got there, and keeps it independent of whatever else
drew from the global generator (dropout masks, other work in the process).
"""

from __future__ import annotations

import random

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler


class EpochSeededLengthSampler(LengthGroupedSampler):
    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Trainer (through accelerate) calls this before each epoch's iterator, resumed or not."""
        self.generator = torch.Generator().manual_seed(random.Random(f"{self.seed}:{epoch}").getrandbits(63))


def epoch_seeded(sampler, seed: int):
    """Trainer's sampler, with its length grouping seeded by (seed, epoch); other samplers as they are."""
    if type(sampler) is LengthGroupedSampler:
        return EpochSeededLengthSampler(sampler.batch_size, sampler.lengths, seed)
    return sampler
