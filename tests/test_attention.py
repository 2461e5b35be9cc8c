"""Copy-free grouped-query attention (llm_module.attention) computes what transformers' sdpa does.

The case that matters is a padded batch: transformers copies keys and values there, and a
mask that went missing (a custom implementation needs its own mask function) would let rows
attend to their padding, which these comparisons catch.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_module.runtime.attention import NAME, use_grouped_attention

PROMPTS = ["Hi", "Tell me a long story about a lighthouse keeper and the sea", "Why is the sky blue?"]


def _models(model_dir):
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="sdpa").eval()
    grouped = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="sdpa").eval()
    assert reference.config.num_key_value_heads < reference.config.num_attention_heads
    assert use_grouped_attention(grouped) and grouped.config._attn_implementation == NAME
    return reference, grouped


def test_padded_batch_matches_sdpa(tiny_model_dir):
    reference, grouped = _models(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert not bool(enc["attention_mask"].all())  # the batch is padded: the path under test
    options = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.inference_mode():
        torch.testing.assert_close(grouped(**enc).logits, reference(**enc).logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(grouped.generate(**enc, **options), reference.generate(**enc, **options))


def test_models_without_grouped_heads_keep_their_attention(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation("sdpa")
    assert not use_grouped_attention(model) and model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    assert not use_grouped_attention(model) and model.config._attn_implementation == "eager"


# ----------------------------------------------------------------------- the decode-step kernel
def _decode_kernel():
    import pytest

    from llm_module.runtime import int4_kernel

    kernel = getattr(int4_kernel.kernel(), "decode_attention", None)
    if kernel is None:
        pytest.skip("llm_module's AVX-512 kernel is not built for this CPU")
    return kernel


def _reference(q, k, v, mask, scale):
    """float64 attention with grouped heads, as transformers' repeat_kv and a softmax give it."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v).transpose(1, 2)


def test_the_decode_kernel_equals_attention_in_float64_for_any_shape_mask_and_cache_view():
    import pytest

    kernel = _decode_kernel()
    generator = torch.Generator().manual_seed(3)
    for rows, heads, kv_heads, dim, length in [(1, 9, 3, 64, 1), (8, 9, 3, 64, 150), (3, 8, 8, 16, 17),
                                               (2, 8, 2, 128, 40), (5, 4, 1, 32, 33)]:
        cache_k = torch.randn(rows, kv_heads, length + 11, dim, generator=generator)  # the slot cache, bigger
        cache_v = torch.randn(rows, kv_heads, length + 11, dim, generator=generator)
        k, v = cache_k[:, :, :length], cache_v[:, :, :length]  # views, as the runner passes them
        q = torch.randn(rows, heads, 1, dim, generator=generator) * 2
        mask = torch.rand(rows, 1, 1, length, generator=generator) > 0.4
        mask[:, :, :, -1] = True  # every row attends to its own newest key at least
        for m in (mask, None):
            got = kernel(q, k, v, m, dim ** -0.5)
            assert got.shape == (rows, 1, heads, dim)
            torch.testing.assert_close(got.double(), _reference(q, k, v, m, dim ** -0.5), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernel(torch.randn(1, 2, 1, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), None, 0.3)


def test_a_row_gets_the_same_attention_whatever_its_batch_mates():
    kernel = _decode_kernel()
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(4, 9, 1, 64, generator=generator)
    k, v = torch.randn(4, 3, 30, 64, generator=generator), torch.randn(4, 3, 30, 64, generator=generator)
    mask = torch.ones(4, 1, 1, 30, dtype=torch.bool)
    mask[2, :, :, :12] = False
    together = kernel(q, k, v, mask, 0.125)
    for row in range(4):
        alone = kernel(q[row:row + 1].contiguous(), k[row:row + 1], v[row:row + 1], mask[row:row + 1], 0.125)
        assert torch.equal(alone[0], together[row])
