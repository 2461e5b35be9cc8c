"""Training while serving: generate on the base model and on other adapters while a job trains;
the answers come and stay exactly what they were before training started."""

from __future__ import annotations

import json
import threading
import time

import pytest

from llm_module.engine import Engine
from llm_module.engine.state import StateFile
from llm_module.errors import Conflict

GREEDY = {"do_sample": False, "max_new_tokens": 8, "return_full_text": False}
PROMPTS = ["Hello", "The weather", "Once upon a time"]


@pytest.fixture()
def engine(tiny_model_dir, tiny_adapter_dir, tmp_path):
    eng = Engine(state_file=StateFile(tmp_path / "state.json"))
    eng.setup(str(tiny_model_dir), adapters={"style": str(tiny_adapter_dir)})
    yield eng
    eng.close()


def test_generation_on_other_adapters_stays_correct_while_a_job_trains(engine, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Code of item {i}?", "input": "",
                                        "output": f"Item {i} has code Z{i}."}) + "\n" for i in range(16)))
    expected = {(p, a): engine.generate(p, adapter=a, **GREEDY) for p in PROMPTS for a in ("base", "style")}
    job = engine.train(str(data), str(tmp_path / "fresh"), {"EPOCHS": 30, "MICRO_BATCH_SIZE": 2, "BATCH_SIZE": 2},
                       background=True)
    deadline = time.monotonic() + 300
    while (engine.job_status(job["job_id"])["progress"].get("step") or 0) < 1:
        assert time.monotonic() < deadline, engine.job_status(job["job_id"])
        time.sleep(0.2)

    answers: list = []

    def caller(adapter: str) -> None:
        for prompt in PROMPTS:
            answers.append(((prompt, adapter), engine.generate(prompt, adapter=adapter, **GREEDY)))

    threads = [threading.Thread(target=caller, args=(a,)) for a in ("base", "style", "base", "style")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert engine.job_status(job["job_id"])["state"] == "running", "the answers came while training ran"
    assert len(answers) == 4 * len(PROMPTS)
    for key, answer in answers:
        assert answer == expected[key], f"{key} changed while training"

    engine.cancel_job(job["job_id"])
    engine.jobs.wait(job["job_id"], timeout=120)
    with pytest.raises(Conflict, match="already ended"):
        engine.cancel_job(job["job_id"])  # cancelling a finished job is refused, clearly
    assert [a["name"] for a in engine.list_adapters()] == ["style"]


def test_a_setup_answers_from_the_old_model_while_it_loads_then_swaps_and_refuses_a_second(engine, tmp_path):
    """Two different models: while the new one loads, every answer is the old model's; a second
    setup meanwhile is refused; once the first finishes, every answer is the new model's."""
    from tests.conftest import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=77)
    old = engine.generate("The weather", adapter="base", **GREEDY)
    loading, release = threading.Event(), threading.Event()
    stage = engine.host.stage

    def held_stage(args):  # the new model is loaded, but not yet served, until released
        staged = stage(args)
        loading.set()
        release.wait(60)
        return staged

    engine.host.stage = held_stage
    results, errors, stop = [], [], threading.Event()

    def keep_generating() -> None:
        while not stop.is_set():
            try:
                results.append(engine.generate("The weather", adapter="base", **GREEDY))
            except Exception as exc:  # a failure here is what the test looks for
                errors.append(exc)

    setup = threading.Thread(target=lambda: engine.setup(str(other)))
    setup.start()
    worker = threading.Thread(target=keep_generating)
    try:  # a failed assertion must not leave the threads running (pytest would hang at exit)
        assert loading.wait(60)
        worker.start()
        with pytest.raises(Conflict, match="Another setup is running"):
            engine.setup(str(other))
        deadline = time.monotonic() + 120
        while len(results) < 3 and not errors and time.monotonic() < deadline:
            time.sleep(0.01)
        during = list(results)
    finally:
        release.set()
        setup.join(120)
        stop.set()
        if worker.is_alive():
            worker.join(60)
    new = engine.generate("The weather", **GREEDY)
    assert not errors, errors[:1]
    assert during and all(r == old for r in during), "an answer during the load came from another model"
    assert new != old and engine.describe()["model"] == "other"
    assert all(r in (old, new) for r in results)
