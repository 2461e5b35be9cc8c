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
