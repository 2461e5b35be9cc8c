"""The heap policy (runtime/memory.py): a forward's activations reuse heap pages instead of faulting
in fresh ones each time (with glibc's mmap threshold at 1 MiB and its trim threshold at 128 KiB, a
prefill of 8 prompts of 17 tokens took 27,000 page faults and ~25 % of its time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Layers of the default model's shape (hidden 576, MLP 1536) over 8 prompts of 17 tokens and over
# 8 of 100 (whose activations are over 1 MiB each); minor page faults counted per forward, the median of
# 10 (the mean of 10 once read 150 for the larger input: one forward that grew the heap, 1 run in 6).
LAYERS = r"""
import json, resource, sys, torch
from llm_module.runtime.memory import set_heap_policy
set_heap_policy()
torch.manual_seed(0)
gate, up, down = torch.randn(576, 1536), torch.randn(576, 1536), torch.randn(1536, 576)
def forward(x):
    for _ in range(8):
        h = torch.nn.functional.silu(x @ gate) * (x @ up)
        x = x + torch.nn.functional.rms_norm(h @ down, (576,))
    return x
faults = {}
for rows in (8 * 17, 8 * 100):
    x = torch.randn(rows, 576)
    for _ in range(3):
        forward(x)
    counts = []
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        forward(x)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    faults[rows] = sorted(counts)[len(counts) // 2]  # the median: a one-off heap growth is not "each time"
print(json.dumps(faults))
"""


def test_a_forwards_activations_do_not_fault_in_fresh_pages_each_time():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", LAYERS], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    faults = json.loads(out.stdout.strip().splitlines()[-1])
    # an activation of 136 x 1536 floats is ~200 pages, one of 800 x 1536 ~1,200; 8 layers make several
    # of each a forward, so a policy that hands them back faults thousands of times a forward
    assert faults["136"] < 100 and faults["800"] < 100, faults
