"""Any causal LM keeps working: one tester over tiny random models of the families users bring.

Each family's model is built locally from a small config (2 layers) with the default tokenizer, in
fp32 with quantization off, where our path must give exactly transformers' own tokens:
setup, greedy generation equal to raw ``model.generate``, batched and mixed-adapter rows equal to
their lone runs, a stream, two training steps, an evaluation.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from llm_module.engine import Engine
from llm_module.engine.state import StateFile
from llm_module.settings import Settings

SEED = 4321
GREEDY = {"do_sample": False, "max_new_tokens": 16, "return_full_text": False}
PROMPTS = ["Hello there", "A much longer prompt about the sea and its many ships", "Why?"]
COMMON = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 512}
FAMILIES = {
    "llama": ("LlamaConfig", COMMON),
    "mistral": ("MistralConfig", {**COMMON, "sliding_window": 24}),  # short window: it bites in these prompts
    "qwen2": ("Qwen2Config", {**COMMON, "use_sliding_window": False}),
    "qwen3": ("Qwen3Config", {**COMMON, "head_dim": 16}),
    "gemma2": ("Gemma2Config", {**COMMON, "head_dim": 16, "sliding_window": 24, "query_pre_attn_scalar": 16,
                                "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}),
    "gemma3": ("Gemma3TextConfig", {**COMMON, "head_dim": 16, "sliding_window": 24, "query_pre_attn_scalar": 16,
                                    "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("Phi3Config", {**COMMON, "pad_token_id": 0}),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512}),
    "gpt_neox": ("GPTNeoXConfig", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "max_position_embeddings": 512}),
}
TARGETS = {"gpt2": ["c_attn"], "gpt_neox": ["query_key_value"]}


def build(family: str, target: Path, eos: list[int] | None = None) -> Path:
    import transformers
    from transformers import AutoModelForCausalLM

    from tests.conftest import _default_tokenizer

    tokenizer = _default_tokenizer()
    config_class, values = FAMILIES[family]
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos or tokenizer.eos_token_id}
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), **special, **values)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config)
    if eos:
        model.generation_config.eos_token_id = eos
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    return target


def lora(model_dir: Path, target: Path, family: str, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS.get(family, "all-linear"),
                                                  task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(str(target))
    return target


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model_dir = build(request.param, root / "model")
    adapters = {name: lora(model_dir, root / name, request.param, seed) for name, seed in (("a", 1), ("b", 2))}
    engine = Engine(Settings(home=root, quantize="none"), state_file=StateFile(root / "state.json"))
    engine.setup(str(model_dir), adapters={k: str(v) for k, v in adapters.items()})
    yield request.param, engine, model_dir, adapters
    engine.close()


def _reference(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_greedy_equals_transformers_generate_for_the_base_and_each_adapter(family):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    name, engine, model_dir, adapters = family
    tokenizer = engine.host.tokenizer
    raw = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    for prompt in PROMPTS:
        assert engine.generate(prompt, adapter="base", **GREEDY)[0]["generated_text"] == _reference(
            raw, tokenizer, prompt, 16), (name, prompt)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapters["a"])).eval()
    expected = _reference(tuned, tokenizer, PROMPTS[1], 16)
    assert engine.generate(PROMPTS[1], adapter="a", **GREEDY)[0]["generated_text"] == expected, name
    assert expected != engine.generate(PROMPTS[1], adapter="base", **GREEDY)[0]["generated_text"]  # it matters


def test_batched_and_mixed_adapter_rows_equal_their_lone_runs_and_a_stream_too(family):
    name, engine, _, _ = family
    cases = [(p, a) for p in PROMPTS for a in ("base", "a", "b")]
    alone = [engine.generate(p, adapter=a, **GREEDY) for p, a in cases]
    results: dict = {}
    threads = [threading.Thread(target=lambda i=i, p=p, a=a: results.__setitem__(i, engine.generate(
        p, adapter=a, **GREEDY))) for i, (p, a) in enumerate(cases)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [results[i] for i in range(len(cases))] == alone, name
    assert engine.generate(PROMPTS, adapter="b", **GREEDY) == [alone[2], alone[5], alone[8]]
    assert "".join(engine.stream(PROMPTS[0], adapter="a", **GREEDY)) == alone[1][0]["generated_text"]


def test_two_training_steps_and_an_evaluation(family, tmp_path):
    name, engine, _, _ = family
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."}
                                for i in range(8)]))
    result = engine.train(str(data), str(tmp_path / "run"), {"MICRO_BATCH_SIZE": 4, "BATCH_SIZE": 4, "EPOCHS": 1,
                                                             "CUTOFF_LEN": 64},
                          training_args_kwargs={"max_steps": 2}, show_progress=False)
    assert result["steps"] == 2 and result["adapter"] == "run", (name, result)
    assert engine.generate("Question 1?", adapter="run", **GREEDY)[0]["generated_text"] is not None
    evaluation = engine.evaluate(str(data), adapter="run")
    assert evaluation["tokens"] > 0 and evaluation["loss"] > 0
    engine.unload_adapter("run")


def test_every_listed_end_id_ends_generation(tmp_path):
    """A Llama-3-style config lists several end ids: generation stops at whichever comes."""
    probe = build("llama", tmp_path / "probe")
    engine = Engine(Settings(home=tmp_path, quantize="none"), state_file=StateFile(tmp_path / "state.json"))
    engine.setup(str(probe))
    free = engine.serving.outputs(engine.serving.build("Hello there", do_sample=False, max_new_tokens=10))[0]
    engine.close()
    second = free.token_ids[1]  # end ids: one the model never emits, then the one it emits second
    model_dir = build("llama", tmp_path / "multi", eos=[engine.host.tokenizer.eos_token_id, second])
    engine = Engine(Settings(home=tmp_path, quantize="none"), state_file=StateFile(tmp_path / "state2.json"))
    try:
        engine.setup(str(model_dir))
        assert engine.host.model.generation_config.eos_token_id == [engine.host.tokenizer.eos_token_id, second]
        ended = engine.serving.outputs(engine.serving.build("Hello there", do_sample=False, max_new_tokens=10))[0]
        first = free.token_ids.index(second)
        assert ended.token_ids == free.token_ids[:first + 1] and ended.finish_reason == "stop"
    finally:
        engine.close()


def test_rows_continued_from_their_shared_start_give_the_full_forwards_logits(family):
    """Training runs the tokens every row starts with once a step (training/shared_start.py); on every family the
    rows continued from that start's keys and values must get the logits the full rows get, windows included."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llm_module.training.shared_start import SharedStart

    name, _, model_dir, _ = family
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.set_attn_implementation("eager")  # as training runs on a CPU
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS.get(name, "all-linear"),
                                                  task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if "lora_B" in param_name:  # an adapter that changes the shared start's keys and values too
                param.copy_(torch.randn(param.shape, generator=generator))
    shared = torch.randint(5, 200, (1, 30), generator=generator)  # longer than the sliding windows (24)
    ids = torch.cat([shared.repeat(3, 1), torch.randint(5, 200, (3, 12), generator=generator)], dim=1)
    mask = torch.ones_like(ids)
    mask[2, -5:] = 0  # a shorter row, padded on the right as the collator pads
    inputs = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        full = peft_model(**inputs, logits_to_keep=10).logits
        runner = SharedStart(30)
        continued = runner.forward(peft_model, inputs, start=32, keep=10).logits
    real = mask[:, -10:].bool()
    assert torch.allclose(full[real], continued[real], atol=1e-5), (name, (full - continued)[real].abs().max())
    assert runner.tokens_run_once == 30, name  # the first step's check kept the shortcut
