"""Grouped-query attention on a CPU without copying keys and values, and a kernel of our own for
decoding steps.

transformers' ``sdpa`` attention hands grouped-query attention (the default model has 9 query
heads per 3 key/value heads) to torch's ``enable_gqa`` only when there is no attention mask;
with one (any batch whose prompts have different lengths) it first copies every layer's keys
and values 3 times over (``repeat_kv``), at every decoding step, for the whole cache. torch's
CPU kernel takes the mask and the grouped heads together, with the same result, so on a CPU
this implementation always passes them through. Everything else is transformers' own ``sdpa``.

A decoding step (one query per row) of a model whose matmuls run on llm_module's kernels goes to
their ``decode_attention`` (csrc/decode_attention.h, AVX-512): torch's kernel for it is made of
small MKL calls, ~200 us a layer for 8 rows on one thread (bench/findings.md).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "llm_module_sdpa"
DECODE_KERNEL = "_llm_module_decode_attention"  # set on attention modules that use our decode kernel


def grouped_sdpa_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    kernel = getattr(module, DECODE_KERNEL, None)
    if kernel is not None and query.shape[2] == 1 and not dropout and not kwargs.get("softcap") \
            and (attention_mask is None or attention_mask.dtype == torch.bool):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return kernel(query.contiguous(), key, value, attention_mask, scale), None
    grouped = getattr(module, "num_key_value_groups", 1) > 1
    if grouped and attention_mask is not None and query.device.type == "cpu" and kwargs.get("position_bias") is None:
        # With a mask transformers never asks for a causal kernel, so none is asked for here either.
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def use_grouped_attention(model: nn.Module) -> bool:
    """Switch a CPU model that uses ``sdpa`` with grouped heads to the copy-free path; True if switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", heads)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not heads or kv_heads == heads:
        return False
    AttentionInterface.register(NAME, grouped_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the same masks as sdpa
    model.set_attn_implementation(NAME)
    return True


def use_decode_attention(model: nn.Module) -> int:
    """Send the decoding steps of a model switched to ``NAME`` to llm_module's decode kernel, where it
    is built for this CPU and fits (float32, head size a multiple of 16, no soft-capping or sinks);
    the number of attention layers switched."""
    from . import int4_kernel

    kernel = getattr(int4_kernel.kernel(), "decode_attention", None)
    config = getattr(model, "config", None)
    if kernel is None or getattr(config, "_attn_implementation", None) != NAME:
        return 0
    if next(model.parameters()).dtype != torch.float32 or getattr(config, "attn_logit_softcapping", None):
        return 0
    switched = 0
    for module in model.modules():
        head_dim = getattr(module, "head_dim", None)
        if hasattr(module, "num_key_value_groups") and head_dim and head_dim % 16 == 0 \
                and not hasattr(module, "sinks"):
            setattr(module, DECODE_KERNEL, kernel)
            switched += 1
    return switched
