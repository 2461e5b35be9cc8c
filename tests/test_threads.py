"""Model work never runs in the caller's thread: only the serving loop is a long-lived torch thread.

Why it matters is in llm_module/runtime/threads.py (libgomp stops spin-waiting once a second long-lived
thread has run torch ops, halving single-stream speed on 2 cores); the speed itself is measured in
bench/, this checks the rule that keeps it.
"""

from __future__ import annotations

import json
import threading

import pytest

from llm_module.runtime.threads import run_in_fresh_thread

RECORDS = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
           {"instruction": "Name a fruit.", "input": "", "output": "A pear."}]


@pytest.fixture()
def forward_threads(engine):
    """The threads that ran a forward pass of the engine's model, recorded by a hook on the embedding."""
    seen: list[threading.Thread] = []
    embedding = engine.host.model.get_input_embeddings()
    handle = embedding.register_forward_pre_hook(lambda module, args: seen.append(threading.current_thread()))
    yield seen
    handle.remove()


def test_no_forward_pass_runs_in_the_callers_thread(engine, forward_threads, tiny_adapter_dir, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS))
    engine.generate("Hello", max_new_tokens=3, do_sample=False)
    assert forward_threads and {t.name for t in forward_threads} == {"llm-serving"}
    engine.load_adapter(str(tiny_adapter_dir), "style")
    engine.generate("Hello", adapter="style", max_new_tokens=3, do_sample=False)
    engine.evaluate(str(data), adapter="style")
    engine.select_informative(str(data), k=1, max_new_tokens=3)
    "".join(engine.stream("Hello", max_new_tokens=3, do_sample=False))
    engine.unload_adapter("style")
    caller = threading.current_thread()
    assert len(forward_threads) > 5
    assert caller not in forward_threads, "a forward pass ran in the caller's (long-lived) thread"
    assert {t.name for t in forward_threads} == {"llm-serving"}  # evaluation and scoring too


def test_fresh_thread_returns_results_and_raises_errors():
    assert run_in_fresh_thread(lambda a, b=0: (threading.current_thread().name, a + b), 1, b=2) == (
        "llm-model-work", 3)
    with pytest.raises(KeyError, match="gone"):
        run_in_fresh_thread(lambda: {}["gone"])


def test_streams_run_on_the_serving_thread_and_stop_when_the_reader_leaves(engine, forward_threads):
    pieces = engine.stream("Once upon a time", max_new_tokens=200, min_new_tokens=200, do_sample=False)
    next(pieces)
    pieces.close()  # a client that disconnected after the first piece
    engine.serving.call(lambda: None)  # runs between two steps: the stream's row has gone by then
    assert {t.name for t in forward_threads} == {"llm-serving"}
    assert len(forward_threads) < 100, f"{len(forward_threads)} forward passes: the stream ran on without a reader"


def test_calls_run_on_the_serving_thread_and_raise_their_errors(engine):
    assert engine.serving.call(lambda: threading.current_thread().name) == "llm-serving"
    with pytest.raises(ZeroDivisionError):
        engine.serving.call(lambda: 1 / 0)
    assert engine.generate("Hi", max_new_tokens=2, do_sample=False)  # the loop lives on
