"""Grouped-query attention on a CPU without copying keys and values.

transformers' ``sdpa`` attention hands grouped-query attention (the default model has 9 query
heads per 3 key/value heads) to torch's ``enable_gqa`` only when there is no attention mask;
with one (any batch whose prompts have different lengths) it first copies every layer's keys
and values 3 times over (``repeat_kv``), at every decoding step, for the whole cache. torch's
CPU kernel takes the mask and the grouped heads together, with the same result, so on a CPU
this implementation always passes them through. Everything else is transformers' own ``sdpa``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "llm_module_sdpa"


def grouped_sdpa_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
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
