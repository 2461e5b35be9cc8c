"""Model work never runs in the caller's thread: only the serving loop is a long-lived torch thread.

Why it matters is in llm_module/runtime/threads.py (libgomp stops spin-waiting once a second long-lived
thread has run torch ops, halving single-stream speed on 2 cores); the speed itself is measured in
bench/, this checks the rule that keeps it.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from llm_module.runtime import int4_kernel
from llm_module.runtime.threads import _GOMP_FUNCTIONS, _find_library, kernels_own_the_cores, run_in_fresh_thread

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


# ------------------------------------------------------------- the serving thread and OpenMP
def test_the_libgomp_we_set_is_torchs_own_even_beside_another_wheels_copy():
    """sentencepiece vendors a libgomp of its own, loaded beside torch's: setting that one's thread
    count changed nothing of torch's (the thread-robustness fix did nothing until this was found)."""
    import sentencepiece  # noqa: F401  (its libgomp-*.so is loaded now)

    lib = _find_library("libgomp", _GOMP_FUNCTIONS)
    assert lib is not None and lib._name.startswith(str(Path(torch.__file__).parent))


def test_inside_the_block_torch_runs_on_one_thread_and_after_it_as_before():
    before = torch.get_num_threads()
    assert before > 1, "this check needs a machine with 2 cores or more"
    with kernels_own_the_cores():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with kernels_own_the_cores(enabled=False):
        assert torch.get_num_threads() == before


def _forward_threads(engine) -> list[tuple[int, int]]:
    """(tokens fed, torch's thread count) of each forward pass of one generation."""
    seen: list[tuple[int, int]] = []
    hook = engine.host.model.get_input_embeddings().register_forward_pre_hook(
        lambda module, args: seen.append((args[0].numel(), torch.get_num_threads())))
    try:
        engine.generate("Hello there, how are you today?", max_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    return seen


@pytest.mark.skipif(int4_kernel.kernel() is None, reason="llm_module's kernel cannot run on this CPU")
def test_a_model_on_our_kernels_decodes_few_rows_with_one_openmp_thread(tmp_path):
    """Its matmuls are split by the kernels' own workers, so torch's ops in the serving thread
    leave the cores to them: no OpenMP team for other threads' idle teams to slow down. A forward
    of many tokens (the prompt here) gets torch's threads back for its other ops."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm_module.engine import Engine
    from llm_module.engine.state import StateFile
    from llm_module.serving.runner import OWN_WORKERS_MAX_TOKENS
    from tests.conftest import _default_tokenizer

    tokenizer = _default_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(str(tmp_path / "model"))
    tokenizer.save_pretrained(str(tmp_path / "model"))
    engine = Engine(state_file=StateFile(tmp_path / "state.json"))
    try:
        engine.setup(str(tmp_path / "model"), quantize="int4")
        assert engine.host.patches.int4_kernel.startswith("llm_module")
        # its one layer's decoding steps run on our attention too, where that kernel is built (AVX-512 only)
        has_decode_kernel = hasattr(int4_kernel.kernel(), "decode_attention")
        assert engine.host.patches.decode_attention == (1 if has_decode_kernel else 0)
        caller_threads = torch.get_num_threads()
        seen = _forward_threads(engine)
        few = {threads for tokens, threads in seen if tokens <= OWN_WORKERS_MAX_TOKENS}
        many = {threads for tokens, threads in seen if tokens > OWN_WORKERS_MAX_TOKENS}
        assert few == {1} and many == {caller_threads}, seen
        assert torch.get_num_threads() == caller_threads  # the caller's own setting is untouched
    finally:
        engine.close()


def test_a_model_on_torchs_kernels_keeps_torchs_threads(engine):
    assert {threads for _, threads in _forward_threads(engine)} == {torch.get_num_threads()} != {1}


def test_a_block_inside_a_block_gives_torchs_threads_back_and_takes_them_again():
    if int4_kernel.kernel() is None:
        pytest.skip("llm_module's kernel cannot run on this CPU")
    before = torch.get_num_threads()
    with kernels_own_the_cores():
        with kernels_own_the_cores(False):
            assert torch.get_num_threads() == before
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
