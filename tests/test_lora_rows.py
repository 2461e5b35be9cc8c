"""Per-row adapters: each row of a forward gives exactly what peft gives it with that adapter alone."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from llm_module.runtime.lora_rows import BASE, LoraRows, can_stack, one_adapter

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


def _rows(model, slots: int, adapters: dict[int, str]) -> LoraRows:
    rows = LoraRows(model.get_base_model(), slots)
    for slot, adapter in adapters.items():
        rows.assign(slot, None if adapter == BASE else adapter)
    return rows


@pytest.mark.parametrize("names", [["narrow", "wide", BASE], ["wide", "wide", "wide"], ["narrow", BASE, "narrow"]])
def test_each_row_matches_its_adapter_alone(tuned, names):
    assert can_stack(tuned, names)
    rows = _rows(tuned, 3, dict(enumerate(names)))
    with torch.inference_mode():
        expected = torch.cat([_alone(tuned, name, IDS[i:i + 1]) for i, name in enumerate(names)])
        rows.select(slice(0, 3))
        with rows.installed():
            got = tuned.get_base_model()(IDS).logits
        for i, name in enumerate(names):  # the adapter really changes what the row gives
            other = "wide" if name != "wide" else BASE
            assert (expected[i] - _alone(tuned, other, IDS[i:i + 1])[0]).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_rows_gathered_from_scattered_slots_and_moved_rows_keep_their_adapter(tuned):
    """Prefilling rows sit in any free slots; a row moved into another slot takes its adapter along."""
    rows = _rows(tuned, 6, {1: "wide", 4: "narrow", 5: BASE})
    with torch.inference_mode():
        expected = torch.cat([_alone(tuned, name, IDS[i:i + 1]) for i, name in enumerate(["wide", "narrow", BASE])])
        rows.select(torch.tensor([1, 4, 5]))
        with rows.installed():
            gathered = tuned.get_base_model()(IDS).logits
        rows.move(4, 0)
        rows.swap(1, 5)
        rows.select(torch.tensor([5, 0, 1]))
        with rows.installed():
            moved = tuned.get_base_model()(IDS).logits
    torch.testing.assert_close(gathered, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-4)


def test_tables_grow_with_the_highest_slot_in_use_and_are_freed_when_idle(tuned):
    """The per-slot tables cost a copy of an adapter per slot: only the slots in use get one."""
    rows = _rows(tuned, 16, {0: "wide", 1: "narrow"})
    sizes = lambda: sum(t.numel() for layer in rows.layers for t in (layer.a, layer.b) if t is not None)  # noqa: E731
    with torch.inference_mode():
        expected = torch.cat([_alone(tuned, name, IDS[i:i + 1]) for i, name in enumerate(["wide", "narrow", BASE])])
        rows.select(slice(0, 2))
        small = sizes()
        assert rows.layers[0].a.shape[0] == 2 and small > 0
        rows.assign(5, BASE)  # a row placed in a slot past the tables, then a mixed range reaching it
        rows.select(torch.tensor([0, 1, 5]))
        with rows.installed():
            grown = tuned.get_base_model()(IDS).logits
        assert rows.layers[0].a.shape[0] == 6 and sizes() == 3 * small
        rows.release_tables()
        assert sizes() == 0
        rows.select(torch.tensor([0, 1, 5]))  # made again, with every slot's adapter
        with rows.installed():
            again = tuned.get_base_model()(IDS).logits
    torch.testing.assert_close(grown, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, expected, rtol=1e-4, atol=1e-4)


def test_layers_are_restored_after_the_block(tuned):
    tuned.set_adapter("wide")
    with torch.inference_mode():
        before = tuned(IDS).logits
        rows = _rows(tuned, 3, {0: "narrow", 1: "narrow", 2: "narrow"})
        rows.select(slice(0, 3))
        with pytest.raises(ValueError), rows.installed():
            raise ValueError("a failed step")
        after = tuned(IDS).logits
    torch.testing.assert_close(after, before)
    assert not any("forward" in vars(m) for m in tuned.modules())


def test_one_adapter_for_a_whole_beam_search(tuned):
    options = {"max_new_tokens": 6, "num_beams": 2, "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        with one_adapter(tuned.get_base_model(), "narrow"):
            stacked = tuned.get_base_model().generate(input_ids=IDS, **options)
        reference = tuned.generate(input_ids=IDS, adapter_names=["narrow"] * 3, **options)
    assert torch.equal(stacked, reference)


def test_dora_adapters_cannot_be_stacked(tiny_model_dir, tmp_path):
    _save_adapter(tiny_model_dir, tmp_path / "dora", seed=3, r=4, target_modules=["q_proj"], use_dora=True)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    model = PeftModel.from_pretrained(base, str(tmp_path / "dora"), adapter_name="d").eval()
    assert not can_stack(model, ["d"])


def test_layers_left_empty_by_an_unload_are_skipped(tiny_model_dir, tiny_adapter_dir, tmp_path):
    """peft keeps a LoRA layer after the only adapter on it is unloaded; slots still move (the chaos soak's crash)."""
    wide = tmp_path / "wide"
    _save_adapter(tiny_model_dir, wide, seed=7, r=8, lora_alpha=8, target_modules="all-linear")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    model = PeftModel.from_pretrained(base, str(tiny_adapter_dir), adapter_name="narrow")
    model.load_adapter(str(wide), adapter_name="wide")
    model.delete_adapter("wide")  # layers only "wide" targeted stay, holding no adapter
    rows = _rows(model, 3, {0: "narrow", 1: BASE, 2: "narrow"})
    rows.select(slice(0, 3))  # mixed: the per-slot tables are made
    rows.move(2, 1)  # a row leaves and the last one takes its slot
    rows.assign(2, None)
    with torch.inference_mode():
        expected = torch.cat([_alone(model, "narrow", IDS[0:1]), _alone(model, "narrow", IDS[1:2])])
        rows.select(slice(0, 2))
        with rows.installed():
            got = model.get_base_model()(IDS[:2]).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
