"""RMSNorm as one op: torch's fused ``rms_norm`` for transformers' plain RMSNorm layers.

transformers' Llama-family RMSNorm computes ``weight * x * rsqrt(mean(x^2) + eps)`` in seven ops;
torch's ``rms_norm`` does the same arithmetic in one, bitwise equal in float32 (tested), and a
decode step of the default model runs 61 of them. Other dtypes keep transformers' code (it rounds
in between), and so do norms that compute something else (Gemma's scales by ``1 + weight``).
"""

from __future__ import annotations

import types

import torch
from torch import nn

# transformers' RMSNorm classes that compute exactly ``weight * x * rsqrt(mean(x^2) + eps)``.
PLAIN_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"}


def use_fused_rms_norm(model: nn.Module) -> int:
    """Run a float32 model's plain RMSNorms as torch's single ``rms_norm`` op; return how many."""
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (type(module).__name__ in PLAIN_RMS_NORMS and isinstance(weight, torch.Tensor)
                and weight.dtype == torch.float32 and hasattr(module, "variance_epsilon")):
            module.forward = types.MethodType(_fused_rms_norm_forward, module)  # a copy rebinds it
            count += 1
    return count


def undo_fused_rms_norm(model: nn.Module) -> None:
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "__func__", None) is _fused_rms_norm_forward:
            del module.forward


def _fused_rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != torch.float32:
        return type(self).forward(self, hidden_states)
    weight = self._parameters["weight"]
    return torch.rms_norm(hidden_states, weight.shape, weight, self.variance_epsilon)
