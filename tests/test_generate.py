"""generate on a tiny random Llama: result shapes, options, batching, errors."""

from __future__ import annotations

import threading

import pytest

from llm_module.engine import Engine
from llm_module.engine.state import StateFile
from llm_module.errors import InvalidInput, LLMError, PayloadTooLarge
from llm_module.settings import Settings

GREEDY = {"do_sample": False, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    state = StateFile(tmp_path_factory.mktemp("state") / "state.json")
    eng = Engine(Settings(max_prompts=64, home=state.path.parent), state_file=state)
    eng.setup(str(tiny_model_dir))
    yield eng
    eng.close()


def test_single_prompt_returns_pipeline_shape_with_full_text(engine):
    result = engine.generate("Hello there", **GREEDY)
    assert isinstance(result, list) and len(result) == 1
    assert set(result[0]) == {"generated_text"}
    assert result[0]["generated_text"].startswith("Hello there")
    assert len(result[0]["generated_text"]) > len("Hello there")


def test_return_full_text_false_gives_only_the_completion(engine):
    full = engine.generate("Hello there", **GREEDY)[0]["generated_text"]
    new = engine.generate("Hello there", return_full_text=False, **GREEDY)[0]["generated_text"]
    assert full == "Hello there" + new


def test_list_of_prompts_gives_one_list_per_prompt_same_as_alone(engine):
    prompts = ["One", "A much longer prompt that needs padding in a batch", "Three"]
    batched = engine.generate(prompts, **GREEDY)
    assert [len(r) for r in batched] == [1, 1, 1]
    alone = [engine.generate(p, **GREEDY)[0] for p in prompts]
    assert [r[0] for r in batched] == alone


def test_num_return_sequences(engine):
    result = engine.generate("Hi", do_sample=True, num_return_sequences=3, max_new_tokens=5, seed=1)
    assert len(result) == 3


def test_same_seed_same_text_and_other_seed_differs(engine):
    opts = {"do_sample": True, "temperature": 1.5, "max_new_tokens": 12}
    first = engine.generate("Story:", seed=7, **opts)
    assert engine.generate("Story:", seed=7, **opts) == first
    others = [engine.generate("Story:", seed=s, **opts) for s in (8, 9, 10)]
    assert any(o != first for o in others)


def test_stop_cuts_before_the_stop_string(engine):
    text = engine.generate("Hello", return_full_text=False, do_sample=False, max_new_tokens=20)[0]["generated_text"]
    assert len(text) > 3
    stop = text[2:4]
    cut = engine.generate("Hello", return_full_text=False, do_sample=False, max_new_tokens=20, stop=[stop])
    assert cut[0]["generated_text"] == text[: text.find(stop)]


def test_chat_and_messages_use_the_template(engine):
    via_chat = engine.generate("What is 2+2?", chat=True, **GREEDY)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert engine.generate(messages=messages, **GREEDY) == via_chat
    assert not via_chat[0]["generated_text"].startswith("What is")  # chat returns only the answer


def test_concurrent_callers_each_get_their_own_answer(engine):
    prompts = [f"Prompt number {i}" for i in range(8)]
    expected = {p: engine.generate(p, **GREEDY) for p in prompts}
    results: dict = {}

    def call(p):
        results[p] = engine.generate(p, **GREEDY)

    threads = [threading.Thread(target=call, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "x", "max_new_tokns": 4}, "Did you mean 'max_new_tokens'"),
        ({"prompt": "x", "max_new_tokens": -1}, "max_new_tokens must be >= 1"),
        ({"prompt": "x", "max_new_tokens": "many"}, "max_new_tokens must be an integer"),
        ({"prompt": "x", "temperature": 0, "do_sample": True}, "temperature must be > 0"),
        ({"prompt": "x", "top_p": 2.0, "do_sample": True}, "top_p must be in (0, 1]"),
        ({"prompt": "x", "do_sample": "yes"}, "do_sample must be true or false"),
        ({"prompt": "x", "stop": [""]}, "stop must be a string or a list"),
        ({"prompt": "x", "seed": "abc"}, "seed must be an integer"),
        ({"prompt": "x", "adapter": "nope"}, "No adapter named 'nope'"),
        ({"prompt": ""}, "empty"),
        ({"prompt": None}, "prompt must be a string or a non-empty list"),
        ({"prompt": []}, "prompt must be a string or a non-empty list"),
        ({"prompt": ["ok", 3]}, "prompt[1] is empty or not a string"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0] must be an object with role"),
        ({"messages": "hi"}, "messages must be a non-empty list"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "either prompt or messages"),
    ],
)
def test_bad_generate_input_is_refused_with_a_clear_message(engine, kwargs, message):
    with pytest.raises(LLMError) as info:
        engine.generate(**kwargs)
    assert message in str(info.value)
    assert engine.generate("still works", **GREEDY)[0]["generated_text"]


def test_prompt_longer_than_the_context_is_refused(engine):
    with pytest.raises(InvalidInput, match="model's context is 2048"):
        engine.generate("word " * 3000, **GREEDY)


def test_too_many_prompts_is_refused(engine):
    with pytest.raises(PayloadTooLarge, match="over the cap of 64"):
        engine.generate(["hi"] * 65, **GREEDY)


def test_stream_yields_the_same_text_as_generate(engine):
    pieces = list(engine.stream("Hello there", **GREEDY))
    assert len(pieces) > 1
    assert "".join(pieces) == engine.generate("Hello there", return_full_text=False, **GREEDY)[0]["generated_text"]


def test_min_new_tokens_holds_back_end_of_sequence_like_transformers(tiny_model_dir, tmp_path):
    """With end-of-sequence set to a token greedy decoding reaches early, min_new_tokens must carry
    generation past it, to the very tokens transformers' own processors give."""
    import torch

    eng = Engine(Settings(home=tmp_path), state_file=StateFile(tmp_path / "state.json"))
    eng.setup(str(tiny_model_dir))
    try:
        tokenizer, model = eng.tokenizer, eng.host.model
        enc = tokenizer(["Hello there", "A longer prompt here"], return_tensors="pt", padding=True)
        with torch.inference_mode():
            free = model.generate(**enc, do_sample=False, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id)
        model.generation_config.eos_token_id = int(free[0, -2])  # row 0 would end after 3 tokens
        options = {"do_sample": False, "max_new_tokens": 8, "return_full_text": False}
        ended = eng.generate("Hello there", **options)[0]["generated_text"]
        held = eng.generate(["Hello there", "A longer prompt here"], min_new_tokens=8, **options)
        with torch.inference_mode():
            expected = model.generate(**enc, do_sample=False, max_new_tokens=8, min_new_tokens=8,
                                      pad_token_id=tokenizer.pad_token_id)[:, enc["input_ids"].shape[1]:]
        texts = [r[0]["generated_text"] for r in held]
        assert texts == tokenizer.batch_decode(expected, skip_special_tokens=True)
        assert len(tokenizer(texts[0], add_special_tokens=False)["input_ids"]) > len(
            tokenizer(ended, add_special_tokens=False)["input_ids"])
    finally:
        eng.close()
