"""The serving core: every generation is rows of one running batch, scheduled step by step.

On the tiny fp32 model, where a batched row must give exactly what it gives alone.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

from llm_module.engine import Engine
from llm_module.engine.state import StateFile
from llm_module.errors import Conflict, Overloaded
from llm_module.settings import Settings

GREEDY = {"do_sample": False, "max_new_tokens": 12, "return_full_text": False}


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_adapter_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("serving")
    eng = Engine(Settings(home=home, prefill_chunk=32), state_file=StateFile(home / "state.json"))
    eng.setup(str(tiny_model_dir), adapters={"tiny": str(tiny_adapter_dir)})
    yield eng
    eng.close()


def _in_threads(calls: list) -> list:
    """Run each zero-argument callable in its own thread, all at once; their results in order."""
    results: dict = {}
    threads = [threading.Thread(target=lambda i=i, c=c: results.__setitem__(i, c())) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return [results[i] for i in range(len(calls))]


def test_greedy_equals_raw_model_generate(engine, tiny_model_dir):
    """Our step loop gives the tokens transformers' own generate gives (fp32, no quantization)."""
    from transformers import AutoModelForCausalLM

    raw = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    tokenizer = engine.host.tokenizer
    for prompt in ["Hello there", "A much longer prompt that needs more than one chunk " * 3]:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = raw.generate(**ids, do_sample=False, max_new_tokens=24, pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert engine.generate(prompt, adapter="base", **{**GREEDY, "max_new_tokens": 24})[0][
            "generated_text"] == expected


def test_rows_with_different_settings_share_steps_and_greedy_rows_equal_their_lone_runs(engine):
    prompts = ["One", "Tell me a story about the sea " * 4, "Three", "Why?"]
    options = [GREEDY, {**GREEDY, "adapter": "tiny"}, {**GREEDY, "max_new_tokens": 5},
               {**GREEDY, "repetition_penalty": 1.5, "no_repeat_ngram_size": 2}]
    start = engine.serving.scheduler.snapshot()["decode_steps"]
    alone = [engine.generate(p, **o) for p, o in zip(prompts, options, strict=True)]
    middle = engine.serving.scheduler.snapshot()["decode_steps"]
    together = _in_threads([lambda p=p, o=o: engine.generate(p, **o) for p, o in zip(prompts, options, strict=True)])
    end = engine.serving.scheduler.snapshot()["decode_steps"]
    assert together == alone
    assert end - middle < (middle - start) / 2  # they shared decode steps despite different options


def test_seeded_rows_are_reproducible_whatever_else_is_in_the_batch(engine):
    seeded = {"do_sample": True, "temperature": 1.3, "top_p": 0.9, "top_k": 50, "max_new_tokens": 16,
              "seed": 11, "return_full_text": False}
    alone = engine.generate("Story:", **seeded)
    mates = [lambda: engine.generate("Noise", do_sample=True, max_new_tokens=20),
             lambda: engine.generate("Other", adapter="tiny", **GREEDY)]
    together = _in_threads([lambda: engine.generate("Story:", **seeded), *mates])[0]
    assert together == alone
    assert engine.generate("Story:", **{**seeded, "seed": 12}) != alone


def test_streams_all_make_progress_together(engine):
    long = {"do_sample": False, "max_new_tokens": 60, "min_new_tokens": 60}
    marks: dict = {}

    def read(i: int) -> str:
        text = ""
        for piece in engine.stream(f"Stream number {i}", **long):
            marks.setdefault((i, "first"), time.perf_counter())
            text += piece
        marks[(i, "done")] = time.perf_counter()
        return text

    texts = _in_threads([lambda i=i: read(i) for i in range(4)])
    assert all(texts)
    last_first_piece = max(marks[(i, "first")] for i in range(4))
    first_finish = min(marks[(i, "done")] for i in range(4))
    assert last_first_piece < first_finish  # nobody waited for another stream to end


def test_a_reader_that_leaves_frees_its_row_while_the_others_go_on(engine):
    stream = engine.stream("Leaving early", do_sample=False, max_new_tokens=200, min_new_tokens=200)
    other = threading.Thread(target=lambda: engine.generate("Staying", do_sample=False, max_new_tokens=80,
                                                            min_new_tokens=80))
    other.start()
    next(stream)
    stream.close()  # the client disconnected
    other.join(120)
    row = stream.handle.rows[0]
    assert row.finish_reason == "cancelled"
    assert len(row.tokens) < 40, len(row.tokens)  # it stopped at the next step, not after 200 tokens


def test_a_stop_string_or_the_token_limit_ends_one_row_while_the_rest_continue(engine):
    text = engine.generate("Hello", **{**GREEDY, "max_new_tokens": 20})[0]["generated_text"]
    stop = text[4:7]
    results = _in_threads([lambda: engine.generate("Hello", stop=stop, **{**GREEDY, "max_new_tokens": 20}),
                           lambda: engine.generate("Hello", **{**GREEDY, "max_new_tokens": 3}),
                           lambda: engine.generate("Hello", **{**GREEDY, "max_new_tokens": 20})])
    assert results[0][0]["generated_text"] == text[: text.find(stop)]
    assert len(engine.host.tokenizer(results[1][0]["generated_text"], add_special_tokens=False)["input_ids"]) <= 3
    assert results[2][0]["generated_text"] == text


def test_end_of_sequence_ends_a_row_and_every_listed_id_counts(tiny_model_dir, tmp_path):
    """A model whose generation config lists several end ids stops at each of them."""
    eng = Engine(Settings(home=tmp_path), state_file=StateFile(tmp_path / "state.json"))
    eng.setup(str(tiny_model_dir))
    try:
        free = eng.serving.outputs(eng.serving.build("Hello there", do_sample=False, max_new_tokens=8))[0]
        end = free.token_ids[2]
        eng.host.model.generation_config.eos_token_id = [99999 % len(eng.host.tokenizer), end]
        ended = eng.serving.outputs(eng.serving.build("Hello there", do_sample=False, max_new_tokens=8))[0]
        first = free.token_ids.index(end)
        assert ended.token_ids == free.token_ids[:first + 1] and ended.finish_reason == "stop"
        assert free.finish_reason == "length"
    finally:
        eng.close()


def test_long_prompts_are_prefilled_in_chunks_while_short_ones_decode(engine):
    long_prompt = "word " * 300  # 300+ tokens: ten chunks of 32
    expected = engine.generate(long_prompt, **GREEDY)
    before = engine.serving.scheduler.snapshot()["prefill_steps"]
    short, long = _in_threads([lambda: engine.generate("Hi", **{**GREEDY, "max_new_tokens": 40}),
                               lambda: engine.generate(long_prompt, **GREEDY)])
    assert long == expected
    assert engine.serving.scheduler.snapshot()["prefill_steps"] - before >= 10


def test_past_the_queue_bound_requests_are_refused_with_a_retry_hint(tiny_model_dir, tmp_path):
    eng = Engine(Settings(home=tmp_path, max_batch=1, max_queued=1), state_file=StateFile(tmp_path / "state.json"))
    eng.setup(str(tiny_model_dir))
    try:
        running = eng.stream("First", do_sample=False, max_new_tokens=300, min_new_tokens=300)
        next(running)  # it holds the only row
        waiting = threading.Thread(target=lambda: eng.generate("Second", **GREEDY))
        waiting.start()
        deadline = time.monotonic() + 30
        while eng.serving.scheduler.snapshot()["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(Overloaded) as refused:
            eng.generate("Third", **GREEDY)
        assert refused.value.status == 503 and refused.value.retry_after > 0 and "Retry" in str(refused.value)
        running.close()
        waiting.join(60)
        assert eng.generate("Fourth", **GREEDY)[0]["generated_text"]  # and it serves the next one
    finally:
        eng.close()


def test_unloading_an_adapter_fails_its_running_rows_clearly(tiny_model_dir, tiny_adapter_dir, tmp_path):
    eng = Engine(Settings(home=tmp_path), state_file=StateFile(tmp_path / "state.json"))
    eng.setup(str(tiny_model_dir), adapters={"tiny": str(tiny_adapter_dir)})
    try:
        stream = eng.stream("Go on", adapter="tiny", do_sample=False, max_new_tokens=300, min_new_tokens=300)
        next(stream)
        eng.unload_adapter("tiny")
        with pytest.raises(Conflict, match="unloaded while this request ran"):
            list(stream)
        assert eng.generate("Still here", **GREEDY)[0]["generated_text"]
    finally:
        eng.close()


def test_a_setup_lets_running_rows_finish_on_the_old_model_then_swaps(tiny_model_dir, tmp_path):
    eng = Engine(Settings(home=tmp_path), state_file=StateFile(tmp_path / "state.json"))
    eng.setup(str(tiny_model_dir))
    try:
        before = eng.generate("Hello", **GREEDY)
        stream = eng.stream("Hello", do_sample=False, max_new_tokens=120, min_new_tokens=120)
        first = next(stream)
        swapped = threading.Thread(target=lambda: eng.setup(str(tiny_model_dir)))
        swapped.start()
        rest = "".join(stream)  # the running row finishes on the model it started on
        swapped.join(120)
        assert first and len(rest) > 0 and stream.handle.rows[0].finish_reason == "length"
        assert eng.generate("Hello", **GREEDY) == before
    finally:
        eng.close()


def test_num_return_sequences_and_prompt_lists_become_rows(engine):
    result = engine.generate(["A", "B"], do_sample=True, num_return_sequences=3, max_new_tokens=5, seed=4)
    assert [len(r) for r in result] == [3, 3]
    again = engine.generate(["A", "B"], do_sample=True, num_return_sequences=3, max_new_tokens=5, seed=4)
    assert again == result
    assert len({r["generated_text"] for r in result[0]}) > 1  # the sequences differ from each other


def test_dora_adapters_run_through_peft_in_the_same_batch(tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear",
                                                  use_dora=True))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(5)) * 2.0)
    peft_model.save_pretrained(str(tmp_path / "dora"))
    eng = Engine(Settings(home=tmp_path), state_file=StateFile(tmp_path / "state.json"))
    eng.setup(str(tiny_model_dir), adapters={"d": str(tmp_path / "dora")})
    try:
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                                              str(tmp_path / "dora")).eval()
        tokenizer = eng.host.tokenizer
        ids = tokenizer("Hello there", return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = reference.generate(**ids, do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        dora, base = _in_threads([lambda: eng.generate("Hello there", adapter="d", **GREEDY),
                                  lambda: eng.generate("Hello there", adapter="base", **GREEDY)])
        assert dora[0]["generated_text"] == expected != base[0]["generated_text"]
    finally:
        eng.close()


def test_beam_search_keeps_its_own_path(engine, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    raw = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    tokenizer = engine.host.tokenizer
    ids = tokenizer("Hello", return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = raw.generate(**ids, num_beams=3, do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert engine.generate("Hello", num_beams=3, adapter="base", **{**GREEDY, "max_new_tokens": 8})[0][
        "generated_text"] == expected


def test_a_process_that_exits_while_rows_decode_exits_cleanly(tiny_model_dir, tmp_path):
    """The serving thread is stopped at exit, not killed inside a torch op (which aborts with -6)."""
    script = f"""
from pathlib import Path
from llm_module.engine import Engine
from llm_module.engine.state import StateFile
from llm_module.settings import Settings
home = Path({str(tmp_path)!r})
eng = Engine(Settings(home=home), state_file=StateFile(home / "state.json"))
eng.setup({str(tiny_model_dir)!r})
streams = [eng.stream(f"Still going {{i}}", do_sample=False, max_new_tokens=1000, min_new_tokens=1000)
           for i in range(4)]
for stream in streams:
    next(stream)
print("exiting mid-decode", flush=True)
"""
    for attempt in range(3):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, (attempt, proc.returncode, proc.stderr[-2000:])
        assert "exiting mid-decode" in proc.stdout


def test_rows_that_arrive_during_a_prefill_are_prefilled_before_the_running_rows_next_token():
    """The step order for bursts (scheduler._newcomers_first): the decoding rows wait one step for
    newcomers' prefill, never two in a row, and never when the batch has no room for them."""
    from llm_module.serving.scheduler import Scheduler, Versions

    scheduler = Scheduler(build_runner=lambda: None, versions=lambda: Versions(0, 0, frozenset()), max_rows=4)
    scheduler._decoding = ["running"]
    assert not scheduler._newcomers_first()  # nobody waiting: decode as usual
    scheduler._waiting.extend(["arrived during the prefill"])
    assert scheduler._newcomers_first()  # they go first ...
    assert not scheduler._newcomers_first()  # ... once: the next step decodes whatever waits
    assert scheduler._newcomers_first()
    scheduler._decoding = ["running"] * 4  # no free slot: waiting rows could not be admitted anyway
    assert not scheduler._newcomers_first() and not scheduler._newcomers_first()
    assert scheduler.stats["decodes_deferred"] == 2
