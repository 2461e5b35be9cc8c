"""Named LoRA adapters: load by name, change output, unload, mix in one batch, refuse bad ones."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm_module.engine import Engine
from llm_module.engine.state import StateFile
from llm_module.errors import Conflict, InvalidInput, LLMError, NotFound

GREEDY = {"do_sample": False, "max_new_tokens": 10, "return_full_text": False}
PROMPT = "The weather today"


def _variant(adapter_dir, target, scale):
    """A second adapter: same shapes, other weights."""
    shutil.copytree(adapter_dir, target)
    weights = target / "adapter_model.safetensors"
    tensors = {k: (v * scale if "lora_B" in k else v) for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    return target


@pytest.fixture()
def two_adapters(tiny_adapter_dir, tmp_path):
    return tiny_adapter_dir, _variant(tiny_adapter_dir, tmp_path / "other", -1.7)


def _text(engine, **kw):
    return engine.generate(PROMPT, **GREEDY, **kw)[0]["generated_text"]


def test_adapter_loads_by_name_changes_output_and_unloads(engine, tiny_adapter_dir):
    base = _text(engine)
    info = engine.load_adapter(str(tiny_adapter_dir), "style")
    assert info["name"] == "style" and info["size_bytes"] > 0
    assert [a["name"] for a in engine.list_adapters()] == ["style"]
    tuned = _text(engine, adapter="style")
    assert tuned != base
    assert _text(engine) == base  # no default adapter: base model
    engine.unload_adapter("style")
    assert engine.list_adapters() == []
    assert _text(engine) == base
    assert engine.adapters.peft_model is None and not any("lora" in n for n, _ in engine.host.model.named_modules())


def test_default_adapter_applies_when_none_is_named(engine, tiny_adapter_dir):
    engine.load_adapter(str(tiny_adapter_dir), "style")
    tuned = _text(engine, adapter="style")
    base = _text(engine)
    engine.set_default_adapter("style")
    assert _text(engine) == tuned
    assert _text(engine, adapter="base") == base
    engine.set_default_adapter(None)
    assert _text(engine) == base


def test_mixed_adapter_batch_matches_each_adapter_alone(engine, two_adapters):
    first, second = two_adapters
    engine.load_adapter(str(first), "a")
    engine.load_adapter(str(second), "b")
    expected = {name: _text(engine, adapter=name) for name in ("a", "b", "base")}
    assert len(set(expected.values())) == 3
    results: dict = {}

    def call(i, name):
        results[i] = (name, _text(engine, adapter=name))

    names = ["a", "b", "base"] * 4
    threads = [threading.Thread(target=call, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == len(names)
    for name, text in results.values():
        assert text == expected[name], f"adapter {name} got another adapter's output"
    assert engine.serving.scheduler.stats["largest_batch"] > 1  # they really shared forward passes


def test_unloading_one_adapter_keeps_the_other(engine, two_adapters):
    first, second = two_adapters
    engine.load_adapter(str(first), "a")
    engine.load_adapter(str(second), "b")
    only_b = _text(engine, adapter="b")
    engine.unload_adapter("a")
    assert _text(engine, adapter="b") == only_b
    with pytest.raises(NotFound, match="No adapter named 'a'"):
        _text(engine, adapter="a")


def test_setup_with_adapters_and_lora_dir(tiny_model_dir, two_adapters, tmp_path):
    first, second = two_adapters
    eng = Engine(state_file=StateFile(tmp_path / "s.json"))
    try:
        info = eng.setup(str(tiny_model_dir), lora_dir=str(first), adapters={"second": str(second)})
        assert sorted(info["adapters"]) == ["adapter", "second"]
        assert info["default_adapter"] == "adapter"
        assert eng.generate(PROMPT, **GREEDY) == eng.generate(PROMPT, adapter="adapter", **GREEDY)
    finally:
        eng.close()


def test_setup_is_restored_in_a_new_engine(tiny_model_dir, tiny_adapter_dir, tmp_path):
    state = StateFile(tmp_path / "state.json")
    first = Engine(state_file=state)
    first.setup(str(tiny_model_dir))
    first.load_adapter(str(tiny_adapter_dir), "style", make_default=True)
    expected = first.generate(PROMPT, **GREEDY)
    first.close()
    second = Engine(state_file=state)
    try:
        info = second.setup(restore=True)
        assert info["model"] == tiny_model_dir.name
        assert info["adapters"] == ["style"] and info["default_adapter"] == "style"
        assert second.generate(PROMPT, **GREEDY) == expected
    finally:
        second.close()


def test_setup_again_replaces_the_model_cleanly(engine, tiny_model_dir, tiny_adapter_dir, tmp_path):
    """A second, different model: its own answers, and no adapter of the first one left on it."""
    from tests.conftest import build_tiny_model

    other = build_tiny_model(tmp_path / "other-model", seed=99)
    engine.load_adapter(str(tiny_adapter_dir), "style")
    first = _text(engine, adapter="base")
    info = engine.setup(str(other))
    assert info["adapters"] == [] and info["ready"] and info["model"] == "other-model"
    second = _text(engine)
    assert second != first
    with pytest.raises(NotFound, match="No adapter named 'style'"):
        _text(engine, adapter="style")
    engine.setup(str(tiny_model_dir))
    assert _text(engine) == first


def _break(adapter_dir) -> None:
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"not a safetensors file")


@pytest.mark.parametrize("where", ["same folder", "another folder"])
def test_a_failed_reload_keeps_serving_the_previous_weights(engine, two_adapters, tmp_path, where):
    """The adapter's own answers after a reload whose files are broken: not the base model's, not a mix."""
    first, _ = two_adapters
    live = tmp_path / "live"
    shutil.copytree(first, live)
    engine.load_adapter(str(live), "a")
    before, base = _text(engine, adapter="a"), _text(engine, adapter="base")
    assert before != base
    source = live if where == "same folder" else tmp_path / "broken"
    if where != "same folder":
        shutil.copytree(first, source)
    _break(source)
    with pytest.raises(InvalidInput, match="not a readable safetensors file"):
        engine.load_adapter(str(source), "a", replace=True)
    assert [a["name"] for a in engine.list_adapters()] == ["a"]
    assert _text(engine, adapter="a") == before
    engine.load_adapter(str(first), "a", replace=True)  # a good reload still replaces
    assert _text(engine, adapter="a") == before  # (the same weights as live's originals)


def test_bad_adapters_are_refused_and_the_model_still_answers(engine, tiny_adapter_dir, tmp_path):
    base = _text(engine)
    empty = tmp_path / "not_an_adapter"
    empty.mkdir()
    cases = [
        (lambda: engine.load_adapter(str(tmp_path / "missing"), "x"), NotFound, "does not exist"),
        (lambda: engine.load_adapter(str(empty), "x"), InvalidInput, "not a LoRA adapter"),
        (lambda: engine.load_adapter(str(tiny_adapter_dir), "bad name!"), InvalidInput, "is not valid"),
        (lambda: engine.unload_adapter("ghost"), NotFound, "No adapter named 'ghost'"),
        (lambda: engine.set_default_adapter("ghost"), NotFound, "No adapter named 'ghost'"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    engine.load_adapter(str(tiny_adapter_dir), "style")
    with pytest.raises(Conflict, match="already loaded"):
        engine.load_adapter(str(tiny_adapter_dir), "style")
    assert _text(engine) == base


def test_adapter_for_another_base_model_is_refused(engine, tiny_adapter_dir, tmp_path):
    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_adapter_dir, foreign)
    weights = foreign / "adapter_model.safetensors"
    # Same module names, other hidden size: what an adapter of another base model looks like.
    tensors = {k: torch.zeros(v.shape[0] * 2 if "lora_B" in k else v.shape[0], v.shape[1] * 2 if "lora_A" in k
                              else v.shape[1]) for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    engine.load_adapter(str(tiny_adapter_dir), "good")
    good = _text(engine, adapter="good")
    with pytest.raises(LLMError, match="another base model"):
        engine.load_adapter(str(foreign), "foreign")
    assert [a["name"] for a in engine.list_adapters()] == ["good"]
    assert _text(engine, adapter="good") == good


def _dora_adapter(model_dir, target):
    """peft's own DoRA adapter for this base model (random B, so it changes the output), and peft's greedy text."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)), config).eval()
    peft_model.save_pretrained(str(target))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = peft_model.generate(ids, max_new_tokens=GREEDY["max_new_tokens"], do_sample=False)
    return target, tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_dora_adapter_serves_over_unpacked_weights_as_peft_runs_it_mixed_or_alone(engine, tiny_model_dir,
                                                                                   tiny_adapter_dir, tmp_path):
    dora, expected = _dora_adapter(tiny_model_dir, tmp_path / "dora")
    engine.load_adapter(str(dora), "dora")
    engine.load_adapter(str(tiny_adapter_dir), "good")
    alone = {name: _text(engine, adapter=name) for name in ("dora", "good", "base")}
    assert alone["dora"] == expected and len(set(alone.values())) == 3
    results: dict = {}
    names = ["dora", "good", "base"] * 3  # one batch of rows with and without DoRA: peft's adapter_names path
    threads = [threading.Thread(target=lambda i, n: results.update({i: (n, _text(engine, adapter=n))}), args=(i, n))
               for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(len(names))) and all(alone[n] == text for n, text in results.values())


def test_dora_adapter_is_refused_by_name_over_packed_weights_and_the_served_ones_stay(
        tiny_model_dir, tiny_adapter_dir, tmp_path):
    """Over int4 weights peft's DoRA cannot read the base weight: refused as DoRA, not as 'another base model'."""
    dora, _ = _dora_adapter(tiny_model_dir, tmp_path / "dora")
    packed = Engine(state_file=StateFile(tmp_path / "state.json"))
    try:
        packed.setup(str(tiny_model_dir), quantize="int4")
        packed.load_adapter(str(tiny_adapter_dir), "good")
        good = _text(packed, adapter="good")
        with pytest.raises(InvalidInput, match=r"DoRA \(use_dora\) needs the base model's full-precision") as refused:
            packed.load_adapter(str(dora), "dora")
        assert "another base model" not in str(refused.value) and "quantize='none'" in str(refused.value)
        assert [a["name"] for a in packed.list_adapters()] == ["good"]
        assert _text(packed, adapter="good") == good
    finally:
        packed.close()


def test_reload_remembered_brings_back_adapters_of_the_same_model(tiny_model_dir, two_adapters, tmp_path):
    first, second = two_adapters
    state = StateFile(tmp_path / "state.json")
    eng = Engine(state_file=state)
    eng.setup(str(tiny_model_dir), adapters={"a": str(first)})
    eng.load_adapter(str(second), "b", make_default=True)  # loaded while serving
    expected = eng.generate(PROMPT, **GREEDY)
    eng.close()
    restarted = Engine(state_file=state)
    try:
        info = restarted.setup(str(tiny_model_dir), adapters={"a": str(first)}, reload_remembered=True)
        assert info["adapters"] == ["a", "b"] and info["default_adapter"] == "b"
        assert restarted.generate(PROMPT, **GREEDY) == expected
    finally:
        restarted.close()


def test_pickled_adapter_weights_are_refused_unless_allowed(tiny_model_dir, tiny_adapter_dir, tmp_path):
    """A .bin adapter is a pickle, which can run code when loaded: refused by default with the fix named;
    with allow_pickle_adapters it loads through torch's weights_only reader and answers as the original."""
    from llm_module.settings import Settings

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_adapter_dir, pickled)
    weights = pickled / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), str(pickled / "adapter_model.bin"))
    weights.unlink()
    strict = Engine(Settings(home=tmp_path / "strict"), state_file=StateFile(tmp_path / "strict.json"))
    trusting = Engine(Settings(home=tmp_path / "trusting", allow_pickle_adapters=True),
                      state_file=StateFile(tmp_path / "trusting.json"))
    try:
        strict.setup(str(tiny_model_dir))
        with pytest.raises(InvalidInput, match="pickle file, which can run code.*allow_pickle_adapters"):
            strict.load_adapter(str(pickled), "p")
        strict.load_adapter(str(tiny_adapter_dir), "s")
        trusting.setup(str(tiny_model_dir))
        trusting.load_adapter(str(pickled), "p")
        assert _text(trusting, adapter="p") == _text(strict, adapter="s")
    finally:
        strict.close()
        trusting.close()
