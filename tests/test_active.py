"""llm.select_informative: uncertainty of the model's own greedy answer, checked against a plain forward pass."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from llm_module.data.active import record_prompt
from llm_module.engine import Engine
from llm_module.engine.state import StateFile
from llm_module.errors import InvalidInput
from llm_module.settings import Settings
from tests.jsctl_utils import JacSession

POOL = [
    {"instruction": "How much does the Harbor Jacket cost?", "input": ""},
    {"instruction": "Answer as a support agent.", "input": "What color is the Otter Dry Bag?"},
    {"question": "Tell me the material of the Glacier Flask."},
    {"prompt": "Write one word."},
    {"messages": [{"role": "user", "content": "Name a colour."}]},
    {"instruction": "Which year did the Canyon Pack come out?", "output": "2019"},  # outputs are ignored
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_adapter_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("active-home")
    engine = Engine(state_file=StateFile(home / "state.json"))
    engine.setup(str(tiny_model_dir), adapters={"style": str(tiny_adapter_dir)})
    yield engine
    engine.close()


@pytest.fixture()
def pool_file(tmp_path) -> Path:
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in POOL))
    return path


def _reference_entropy(engine: Engine, prompt: str, answer_ids: list[int], adapter: str | None) -> tuple[float, float]:
    """Mean entropy and perplexity of ``answer_ids`` after ``prompt`` by one teacher-forced forward pass."""
    import torch

    tokenizer = engine.host.tokenizer
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    def forward():  # on the model's thread, between the serving loop's steps
        with torch.inference_mode():
            return engine.adapters.peft_model(input_ids=ids, adapter_names=[adapter or "__base__"]).logits[0].float()

    logits = engine.serving.call(forward)
    log_probs = torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1).mean().item()
    nll = -log_probs.gather(-1, torch.tensor(answer_ids).unsqueeze(-1)).mean().item()
    return entropy, math.exp(nll)


def _greedy_ids(engine: Engine, prompt: str, adapter: str | None, max_new_tokens: int) -> list[int]:
    """The answer's token ids from a plain one-prompt generate, cut after its first end-of-sequence token."""
    tokenizer = engine.host.tokenizer
    enc = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    out = engine.serving.call(lambda: engine.adapters.peft_model.generate(
        **enc, do_sample=False, max_new_tokens=max_new_tokens, adapter_names=[adapter or "__base__"],
        pad_token_id=tokenizer.pad_token_id))
    ids = out[0, enc["input_ids"].shape[1]:].tolist()
    eos = tokenizer.eos_token_id
    return ids[:ids.index(eos) + 1] if eos in ids else ids


@pytest.mark.parametrize("adapter", [None, "style"])
def test_scores_equal_a_teacher_forced_forward_pass_and_rank_highest_first(engine, pool_file, adapter):
    result = engine.select_informative(str(pool_file), k=len(POOL), adapter=adapter or "base", max_new_tokens=6,
                                       batch_size=4)
    selected = result["selected"]
    assert result["scored"] == len(POOL) and result["k"] == len(POOL)
    assert [s["score"] for s in selected] == sorted((s["score"] for s in selected), reverse=True)
    assert sorted(s["index"] for s in selected) == list(range(len(POOL)))
    tokenizer = engine.host.tokenizer
    for item in selected[:3]:
        prompt = record_prompt(POOL[item["index"]], tokenizer, "chat")
        answer_ids = _greedy_ids(engine, prompt, adapter, max_new_tokens=6)
        entropy, perplexity = _reference_entropy(engine, prompt, answer_ids, adapter)
        assert item["entropy"] == pytest.approx(entropy, rel=2e-3)
        assert item["perplexity"] == pytest.approx(perplexity, rel=2e-3)
        assert item["model_answer"] == tokenizer.decode(answer_ids, skip_special_tokens=True).strip()


def test_adapter_changes_the_scores_and_perplexity_strategy_ranks_by_perplexity(engine, pool_file):
    base = engine.select_informative(str(pool_file), k=3, adapter="base", max_new_tokens=6)
    tuned = engine.select_informative(str(pool_file), k=3, adapter="style", strategy="perplexity", max_new_tokens=6)
    assert tuned["adapter"] == "style" and base["adapter"] is None
    assert [s["score"] for s in tuned["selected"]] == [s["perplexity"] for s in tuned["selected"]]
    assert [s["entropy"] for s in base["selected"]] != [s["entropy"] for s in tuned["selected"]]
    assert tuned["mean_score_selected"] >= tuned["mean_score_all"]


def test_output_file_holds_records_to_label_with_empty_outputs(engine, pool_file, tmp_path):
    out = tmp_path / "to_label.json"
    result = engine.select_informative(str(pool_file), k=2, output_file=str(out), max_new_tokens=4)
    rows = json.loads(out.read_text())
    assert result["output_file"] == str(out)
    assert [row["pool_index"] for row in rows] == [s["index"] for s in result["selected"]]
    for row in rows:
        assert "output" in row or "messages" in row
        assert row.get("output", "") == ""
        assert isinstance(row["uncertainty"], float)


@pytest.mark.parametrize("kwargs, message", [
    ({"k": 0}, "k must be a whole number >= 1"),
    ({"k": 2, "strategy": "entropi"}, "Did you mean 'entropy'"),
    ({"k": 2, "max_new_tokens": 0}, "max_new_tokens must be a whole number from 1"),
])
def test_bad_arguments_name_the_fix(engine, pool_file, kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        engine.select_informative(str(pool_file), **kwargs)


def test_records_without_prompt_text_are_refused_by_index(engine, tmp_path):
    path = tmp_path / "pool.json"
    path.write_text(json.dumps([{"instruction": "Say hi."}, {"output": "an answer, no question"}]))
    with pytest.raises(InvalidInput, match="Record 1 of pool.json has no prompt"):
        engine.select_informative(str(path), k=1)


def test_text_file_holds_one_prompt_per_line(engine, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("What is a tent?\n\nWhat is a lantern?\n")
    result = engine.select_informative(str(path), k=5, max_new_tokens=3)
    assert result["scored"] == 2 and {s["record"] for s in result["selected"]} == {"What is a tent?",
                                                                                  "What is a lantern?"}


# ------------------------------------------------------------------ through jsctl
@pytest.mark.e2e
def test_active_learning_walkers_select_then_learn_from_the_labelled_file(tmp_path, tiny_model_dir):
    session = JacSession(tmp_path / "jsctl", env={"LLM_MODULE_HOME": str(tmp_path / "home"),
                                                  "LLM_MODULE_CACHE": str(Settings().models_dir)})
    session.load_module(ctx={"model_name": str(tiny_model_dir)})
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps(POOL[:4]))
    to_label = tmp_path / "to_label.json"
    picked, log = session.jac_run("active_learning.jac", walker="select",
                                  ctx={"pool_file": str(pool), "k": 2, "to_label_file": str(to_label)})
    assert picked.get("success"), picked.get("errors") or log[-3000:]
    summary = picked["report"][0]
    assert summary["k"] == 2 and summary["scored"] == 4
    assert summary["mean_score_selected"] >= summary["mean_score_all"]
    rows = json.loads(to_label.read_text())
    for row in rows:  # the person labels them
        row["output"] = "A labelled answer."
    to_label.write_text(json.dumps(rows))
    learned, log = session.jac_run("active_learning.jac", walker="learn", ctx={
        "labelled_file": str(to_label), "output_dir": str(tmp_path / "runs" / "active"),
        "eval_file": str(to_label), "max_steps": 2,
        "training_params": {"MICRO_BATCH_SIZE": 2, "BATCH_SIZE": 2, "CUTOFF_LEN": 64}})
    assert learned.get("success"), learned.get("errors") or log[-3000:]
    trained, evaluated = learned["report"]
    assert trained["adapter"] == "active" and trained["steps"] == 2
    assert evaluated["records"] == 2 and evaluated["loss"] > 0


@pytest.mark.e2e
def test_jsctl_select_informative_errors_reach_the_caller(tmp_path, tiny_model_dir):
    session = JacSession(tmp_path / "jsctl", env={"LLM_MODULE_HOME": str(tmp_path / "home"),
                                                  "LLM_MODULE_CACHE": str(Settings().models_dir)})
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps(POOL[:2]))
    values, log = session.script(
        "actions load module llm_module.llm -ctx " + json.dumps(json.dumps({"model_name": str(tiny_model_dir)})),
        "actions call llm.select_informative -ctx " + json.dumps(json.dumps(
            {"data_file": str(pool), "k": 1, "max_new_tokens": 3})),
        "actions call llm.select_informative -ctx " + json.dumps(json.dumps({"data_file": str(pool), "k": 0})),
        "actions call llm.select_informative -ctx " + json.dumps(json.dumps(
            {"data_file": str(pool), "k": 1, "max_tokens": 3})),
    )
    ok, bad_k, bad_option = values[-3:]
    assert ok["success"], log[-3000:]
    assert ok["result"]["k"] == 1 and ok["result"]["selected"][0]["index"] in (0, 1)
    assert not bad_k["success"] and not bad_option["success"]
    assert "k must be a whole number >= 1" in log  # jaseci logs the action's message
    assert "unknown option 'max_tokens'. Did you mean 'max_new_tokens'?" in log


# ------------------------------------------------------------------ through the HTTP service
@pytest.mark.e2e
def test_service_runs_both_actions_inside_its_data_root(tiny_server, tiny_data_root):
    import requests

    (tiny_data_root / "pool.json").write_text(json.dumps(POOL[:3]))
    (tiny_data_root / "small.json").write_text(json.dumps(
        [{"instruction": "How much does the Harbor Jacket cost?", "input": "", "output": "It costs $226."}]))
    picked = requests.post(tiny_server.url + "/select_informative",
                           json={"data_file": "pool.json", "k": 2, "adapter": "tiny",
                                 "**kwargs": {"max_new_tokens": 3}}, timeout=300)
    assert picked.status_code == 200, picked.text
    assert picked.json()["adapter"] == "tiny" and picked.json()["k"] == 2
    grown = requests.post(tiny_server.url + "/augment", json={"data_file": "small.json",
                                                              "output_file": "small_aug.json"}, timeout=300)
    assert grown.status_code == 200, grown.text
    assert grown.json()["total"] == 2 and (tiny_data_root / "small_aug.json").exists()
    outside = requests.post(tiny_server.url + "/augment", json={"data_file": "small.json",
                                                                "output_file": "/tmp/escape.json"}, timeout=60)
    assert outside.status_code == 403 and "outside the data root" in outside.json()["error"]["message"]
