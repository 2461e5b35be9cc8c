"""The chat-prefix cache (llm_module.prefix_cache) changes how prompts are run, not what comes out.

On the tiny fp32 model the greedy texts with and without the cache are identical: single
prompts, padded batches (whose padding sits between the prefix and each row's own tokens),
mixed adapters and streams. Cached keys and values never outlive the adapter they were
computed with. On the real default model the likelihood of answers moves < 1 %.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from llm_module.engine import Engine
from llm_module.engine.state import StateFile
from llm_module.settings import Settings

GREEDY = {"max_new_tokens": 10, "do_sample": False}
PROMPTS = ["Hi", "Tell me a long story about a lighthouse keeper and the sea", "Why is the sky blue?"]


def _engine(model_dir, tmp_path, name: str, prefix_cache: bool) -> Engine:
    engine = Engine(Settings(home=tmp_path / name, prefix_cache=prefix_cache),
                    state_file=StateFile(tmp_path / f"{name}.json"))
    engine.setup(str(model_dir))
    return engine


@pytest.fixture()
def engines(tiny_model_dir, tmp_path):
    cached = _engine(tiny_model_dir, tmp_path, "cached", True)
    plain = _engine(tiny_model_dir, tmp_path, "plain", False)
    yield cached, plain
    cached.close()
    plain.close()


def test_chat_prompts_give_the_same_text_with_and_without_the_cache(engines):
    cached, plain = engines
    calls = [
        {"prompt": PROMPTS[2], "chat": True},
        {"prompt": PROMPTS, "chat": True},  # rows of different lengths: padding after the prefix
        {"prompt": PROMPTS, "chat": True, "system_prompt": "Answer in one line."},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": PROMPTS[1]}]},
    ]
    for call in calls:
        assert cached.generate(**call, **GREEDY) == plain.generate(**call, **GREEDY), call
    prefixes = cached.serving.prefixes
    assert prefixes.hits >= 4 and len(prefixes) == 3  # three prefixes (plain, system, a history), each reused
    assert "".join(cached.stream(PROMPTS[1], chat=True, **GREEDY)) == "".join(
        plain.stream(PROMPTS[1], chat=True, **GREEDY))


def test_plain_prompts_do_not_touch_the_cache(engines):
    cached, plain = engines
    assert cached.generate(PROMPTS, **GREEDY) == plain.generate(PROMPTS, **GREEDY)
    assert (cached.serving.prefixes.hits, cached.serving.prefixes.misses) == (0, 0)


def test_mixed_adapters_in_one_batch_each_get_their_own_prefix(engines, tiny_adapter_dir):
    import threading

    cached, plain = engines
    for engine in engines:
        engine.load_adapter(str(tiny_adapter_dir), "style")
    rows = ((0, "style"), (1, "base"), (2, "style"), (1, "style"), (0, "base"))

    def together(engine) -> list:
        results: dict = {}
        threads = [threading.Thread(target=lambda i=i, p=p, a=a: results.__setitem__(i, engine.generate(
            PROMPTS[p], chat=True, adapter=a, **GREEDY))) for i, (p, a) in enumerate(rows)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        return [results[i] for i in range(len(rows))]

    with_cache, without = together(cached), together(plain)
    assert with_cache == without
    assert with_cache[0] != with_cache[4]  # the adapter mattered
    assert len(cached.serving.prefixes) == 2  # one prefix, two adapters


def _negated_adapter(source, target):
    """A copy of ``source`` whose LoRA output is the opposite: same shapes, other answers."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = load_file(str(target / "adapter_model.safetensors"))
    save_file({k: -v if "lora_B" in k else v for k, v in weights.items()}, str(target / "adapter_model.safetensors"))
    return target


def test_a_replaced_or_reloaded_adapter_never_sees_stale_keys(engines, tiny_adapter_dir, tmp_path):
    cached, plain = engines
    other = _negated_adapter(tiny_adapter_dir, tmp_path / "negated")
    cached.load_adapter(str(tiny_adapter_dir), "style")
    first = cached.generate(PROMPTS[1], chat=True, adapter="style", **GREEDY)
    cached.load_adapter(str(other), "style", replace=True)
    plain.load_adapter(str(other), "style")
    expected = plain.generate(PROMPTS[1], chat=True, adapter="style", **GREEDY)
    assert expected != first
    assert cached.generate(PROMPTS[1], chat=True, adapter="style", **GREEDY) == expected
    cached.unload_adapter("style")
    cached.load_adapter(str(tiny_adapter_dir), "style")
    assert cached.generate(PROMPTS[1], chat=True, adapter="style", **GREEDY) == first


def test_the_cache_holds_a_bounded_number_of_prefixes(tiny_model_dir, tmp_path):
    engine = _engine(tiny_model_dir, tmp_path, "bounded", True)
    engine.serving.prefixes.max_entries = 2
    for system in ("one", "two", "three"):
        engine.generate("Hi", chat=True, system_prompt=system, max_new_tokens=1)
    assert len(engine.serving.prefixes) == 2
    engine.close()


# --------------------------------------------------------------------------- the real default model
def _answer_nll(model, input_ids: list[int], answer_ids: list[int], cache=None) -> float:
    """Mean negative log-likelihood of ``answer_ids`` fed after ``input_ids`` (after ``cache``'s tokens)."""
    logits = model(input_ids=torch.tensor([input_ids + answer_ids]), past_key_values=cache).logits[0].float()
    start = len(input_ids) - 1  # the logits at position i predict token i + 1
    return float(torch.nn.functional.cross_entropy(logits[start:start + len(answer_ids)], torch.tensor(answer_ids)))


@pytest.mark.slow
def test_default_model_answer_likelihood_within_one_percent(tmp_path):
    """Teacher-forced greedy answers, scored after the whole prompt and after the cached prefix.

    The int4 kernel quantizes most layers' inputs to one int8 part: tiny differences between two
    equally valid computations can flip that rounding, which moved single answers' likelihoods by up
    to 1.4 % (0.35 % with bf16 inputs; bench/findings.md). So this reads every input in two parts
    (~1e-5 of its largest value) to bound what the cache itself changes on the real int4 weights.
    """
    from transformers import DynamicCache

    from llm_module.runtime.quantize import WeightOnlyLinear

    engine = Engine(Settings(home=tmp_path), state_file=StateFile(tmp_path / "state.json"))
    engine.setup()
    tokenizer, model = engine.host.tokenizer, engine.host.model
    for layer in model.modules():
        if isinstance(layer, WeightOnlyLinear):
            layer.input_parts = 2
    ratios = []
    for question in ["Why is the sky blue?", "Give me a recipe for pancakes.", "What makes a good teacher?"]:
        call = engine.serving.build(question, chat=True)
        answer = engine.generate(question, chat=True, max_new_tokens=40, do_sample=False)[0]["generated_text"]
        prompt_ids, prefix_ids = call.request.prompts[0], call.request.prefix
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        assert 10 < len(prefix_ids) < len(prompt_ids) and prompt_ids[:len(prefix_ids)] == prefix_ids
        entry = engine.serving.prefixes.get(prefix_ids, None)  # what the serving core cached for the prefix
        assert entry is not None
        with torch.inference_mode():
            full = _answer_nll(model, prompt_ids, answer_ids)
            layers = [(k[None].clone(), v[None].clone()) for k, v in entry]
            cache = DynamicCache(ddp_cache_data=layers, config=model.config)
            cached = _answer_nll(model, prompt_ids[len(prefix_ids):], answer_ids, cache)
        ratios.append(math.exp(cached - full))
    engine.close()
    assert all(abs(r - 1) < 0.01 for r in ratios), ratios
