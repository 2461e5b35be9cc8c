"""Shared fixtures: a tiny random Llama model (seconds to load) and a LoRA adapter for it.

``tiny_model_dir``: an HF model directory (2 layers, hidden 64) with the real default
tokenizer beside it, so prompts, chat templates and special tokens behave as in production.
``tiny_adapter_dir``: a LoRA adapter for it whose lora_B weights are random, so it
CHANGES greedy output (a fresh LoRA has lora_B = 0 and would change nothing).
Both are session-scoped and read-only for tests: copy them before writing into them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_SEED = 1234


def _default_tokenizer():
    from transformers import AutoTokenizer

    from llm_module.loader import convert_gguf, default_gguf_path

    return AutoTokenizer.from_pretrained(str(convert_gguf(default_gguf_path())))


def build_tiny_model(target: Path) -> Path:
    """Save a random 2-layer Llama with the default tokenizer into ``target``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _default_tokenizer()
    torch.manual_seed(TINY_SEED)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    return target


def build_tiny_adapter(model_dir: Path, target: Path) -> Path:
    """Save a LoRA adapter for the model in ``model_dir`` with randomised lora_B weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(TINY_SEED + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(str(target))
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return build_tiny_adapter(tiny_model_dir, tmp_path_factory.mktemp("tiny-lora") / "adapter")
