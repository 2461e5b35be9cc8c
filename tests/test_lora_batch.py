"""The stacked mixed-adapter forward gives each row exactly what peft gives it with that adapter alone."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from llm_module.lora_batch import BASE, adapter_rows, can_stack, stacked_adapters

IDS = torch.tensor([[1, 42, 7, 99, 3, 18], [1, 5, 6, 7, 8, 9], [1, 77, 3, 12, 40, 2]])


def _save_adapter(model_dir, target, seed: int, **config) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(str(target))


@pytest.fixture(scope="module")
def tuned(tiny_model_dir, tiny_adapter_dir, tmp_path_factory):
    """The tiny model with two adapters of different ranks and target modules."""
    wide = tmp_path_factory.mktemp("wide-lora")
    _save_adapter(tiny_model_dir, wide, seed=7, r=8, lora_alpha=8, target_modules="all-linear")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    model = PeftModel.from_pretrained(base, str(tiny_adapter_dir), adapter_name="narrow")
    model.load_adapter(str(wide), adapter_name="wide")
    return model.eval()


def _alone(model, adapter: str, ids: torch.Tensor) -> torch.Tensor:
    """peft's own single-adapter forward: the reference."""
    if adapter == BASE:
        with model.disable_adapter():
            return model(ids).logits
    model.set_adapter(adapter)
    return model(ids).logits


@pytest.mark.parametrize("rows", [["narrow", "wide", BASE], ["wide", "wide", "wide"], ["narrow", BASE, "narrow"]])
def test_each_row_matches_its_adapter_alone(tuned, rows):
    assert can_stack(tuned, rows)
    with torch.inference_mode():
        expected = torch.cat([_alone(tuned, name, IDS[i:i + 1]) for i, name in enumerate(rows)])
        with stacked_adapters(tuned, rows):
            got = tuned(IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (expected[0] - expected[1]).abs().max() > 1e-3 or rows[0] == rows[1]


def test_layers_are_restored_after_the_block(tuned):
    tuned.set_adapter("wide")
    with torch.inference_mode():
        before = tuned(IDS).logits
        with pytest.raises(ValueError), stacked_adapters(tuned, ["narrow"] * 3):
            raise ValueError("a failed generate")
        after = tuned(IDS).logits
    torch.testing.assert_close(after, before)
    assert not any("forward" in vars(m) for m in tuned.modules())


def test_beam_search_rows_follow_their_adapter(tuned):
    rows = ["narrow", "wide", BASE]
    options = {"max_new_tokens": 6, "num_beams": 2, "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        with stacked_adapters(tuned, rows):
            stacked = tuned.generate(input_ids=IDS, **options)
        reference = tuned.generate(input_ids=IDS, adapter_names=rows, **options)
    assert torch.equal(stacked, reference)


def test_dora_adapters_take_peft_own_path(tiny_model_dir, tmp_path):
    _save_adapter(tiny_model_dir, tmp_path / "dora", seed=3, r=4, target_modules=["q_proj"], use_dora=True)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    model = PeftModel.from_pretrained(base, str(tmp_path / "dora"), adapter_name="d").eval()
    assert not can_stack(model, ["d"])
    context, extra = adapter_rows(model, ["d", BASE])
    assert extra == {"adapter_names": ["d", BASE]}
    with context:
        pass
