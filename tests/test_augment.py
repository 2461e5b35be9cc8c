"""llm.augment: prompts rewritten, answers and facts untouched, deterministic, through real jsctl too."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from llm_module.data.augment import RewriteJob, accept_paraphrase, augment_file, protected_words, wordnet_synonyms
from llm_module.errors import InvalidInput
from llm_module.settings import Settings
from tests.jsctl_utils import JacSession

RECORDS = [
    {"instruction": "How much does the Harbor Jacket cost?", "input": "", "output": "The Harbor Jacket costs $226."},
    {"instruction": "Answer as a Brightwater Outfitters support agent.",
     "input": "What color does the Otter Dry Bag come in?", "output": "The Otter Dry Bag comes in sand beige."},
    {"instruction": "Tell me the material used for the Glacier Flask.", "input": "",
     "output": "The Glacier Flask is made of waxed canvas."},
]


def _write(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z']+|\d+", text)


def test_synonym_copies_keep_answers_and_names_and_use_wordnet_synonyms(tmp_path):
    source = _write(tmp_path / "train.json", RECORDS)
    result = augment_file(source, tmp_path / "aug.json", methods=["synonym"], copies=2, seed=3)
    records = json.loads((tmp_path / "aug.json").read_text())
    assert records[:len(RECORDS)] == RECORDS  # the originals come first, unchanged
    added = records[len(RECORDS):]
    assert result["methods"]["synonym"]["added"] == len(added) > 0
    assert result["total"] == len(records)
    originals = {r["output"]: r for r in RECORDS}
    for record in added:
        original = originals[record["output"]]  # every copy keeps an original answer verbatim
        for field in ("instruction", "input"):
            old, new = _words(original[field]), _words(record[field])
            assert len(old) == len(new)
            for before, after in zip(old, new, strict=True):
                if before != after:
                    assert after.lower() in wordnet_synonyms(before.lower()), (before, after)
                    assert before.lower() not in protected_words([original[field]], original["output"])


def test_same_seed_same_file_other_seed_other_file(tmp_path):
    source = _write(tmp_path / "train.json", RECORDS * 4)
    for name, seed in (("a.json", 7), ("b.json", 7), ("c.json", 8)):
        augment_file(source, tmp_path / name, methods=["synonym", "shuffle"], copies=3, seed=seed)
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert (tmp_path / "a.json").read_text() != (tmp_path / "c.json").read_text()


def test_shuffle_only_reorders_prompt_words(tmp_path):
    source = _write(tmp_path / "train.jsonl", [])
    source.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    result = augment_file(source, tmp_path / "aug.jsonl", methods=["shuffle"], copies=1, seed=0)
    lines = [json.loads(line) for line in (tmp_path / "aug.jsonl").read_text().splitlines()]
    assert result["methods"]["shuffle"]["added"] == len(lines) - len(RECORDS) > 0
    originals = {r["output"]: r for r in RECORDS}
    for record in lines[len(RECORDS):]:
        original = originals[record["output"]]
        changed = False
        for field in ("instruction", "input"):
            old, new = _words(original[field]), _words(record[field])
            assert sorted(w.lower() for w in old) == sorted(w.lower() for w in new)
            changed |= old != new
        assert changed


def test_chat_records_rewrite_the_user_turn_only(tmp_path):
    chat = [{"messages": [{"role": "system", "content": "You answer for a shop."},
                          {"role": "user", "content": "Tell me the price of the Harbor Jacket."},
                          {"role": "assistant", "content": "The Harbor Jacket costs $226."}]}]
    source = _write(tmp_path / "chat.json", chat)
    augment_file(source, tmp_path / "aug.json", methods=["synonym"], copies=1, seed=1)
    copies = json.loads((tmp_path / "aug.json").read_text())
    assert len(copies) == 2
    new = copies[1]["messages"]
    assert new[0] == chat[0]["messages"][0] and new[2] == chat[0]["messages"][2]
    assert new[1]["content"] != chat[0]["messages"][1]["content"]
    assert "Harbor Jacket" in new[1]["content"]


def test_paraphrase_filter_refuses_lost_names_new_numbers_and_echoes():
    job = RewriteJob("How much does the Harbor Jacket cost?", frozenset(), random.Random(0), 0)
    assert accept_paraphrase(job, "What is the price of the Harbor Jacket?\nextra line") == \
        "What is the price of the Harbor Jacket?"
    assert accept_paraphrase(job, "Rewritten: What is the Harbor Jacket's price?") == \
        "What is the Harbor Jacket's price?"
    assert accept_paraphrase(job, "What is the price of the jacket?") is None  # the name was lost
    assert accept_paraphrase(job, "The Harbor Jacket costs $226.") is None  # it answered instead
    assert accept_paraphrase(job, "how much does the harbor jacket cost?") is None  # no real change
    assert accept_paraphrase(job, "") is None


@pytest.mark.parametrize("kwargs, message", [
    ({"methods": ["synonyms"]}, "Did you mean 'synonym'"),
    ({"methods": ["back_translate"]}, "does not translate reliably"),
    ({"methods": []}, "non-empty list"),
    ({"copies": 0}, "copies must be a whole number from 1"),
    ({"rate": 1.5}, "rate must be a number in (0, 1]"),
])
def test_bad_arguments_name_the_fix(tmp_path, kwargs, message):
    source = _write(tmp_path / "train.json", RECORDS)
    with pytest.raises(InvalidInput, match=re.escape(message)):
        augment_file(source, tmp_path / "aug.json", **kwargs)
    assert not (tmp_path / "aug.json").exists()


def test_refuses_to_overwrite_its_input_and_empty_or_prompt_less_files(tmp_path):
    source = _write(tmp_path / "train.json", RECORDS)
    with pytest.raises(InvalidInput, match="data_file itself"):
        augment_file(source, source)
    with pytest.raises(InvalidInput, match="holds no records"):
        augment_file(_write(tmp_path / "empty.json", []), tmp_path / "out.json")
    raw = tmp_path / "notes.txt"
    raw.write_text("some raw text to train on")
    with pytest.raises(InvalidInput, match="raw text"):
        augment_file(raw, tmp_path / "out.json")


# ------------------------------------------------------------------ through jsctl
def _session(tmp_path: Path) -> JacSession:
    return JacSession(tmp_path / "jsctl", env={"LLM_MODULE_HOME": str(tmp_path / "home"),
                                               "LLM_MODULE_CACHE": str(Settings().models_dir)})


@pytest.mark.e2e
def test_jsctl_augment_action_with_paraphrase_and_a_named_error(tmp_path, tiny_model_dir):
    session = _session(tmp_path)
    session.load_module(ctx={"model_name": str(tiny_model_dir)})
    source = _write(tmp_path / "train.json", RECORDS)
    out = tmp_path / "aug.json"
    values, log = session.script(
        "actions load module llm_module.llm",
        "actions call llm.augment -ctx " + json.dumps(json.dumps({
            "data_file": str(source), "output_file": str(out), "methods": ["synonym", "paraphrase"],
            "copies": 2, "seed": 5})),
        "actions call llm.augment -ctx " + json.dumps(json.dumps({
            "data_file": str(source), "output_file": str(tmp_path / "x.json"), "methods": ["paraphrse"]})),
    )
    ok, failed = values[-2], values[-1]
    assert ok["success"], log[-3000:]
    result = ok["result"]
    assert result["original"] == 3 and result["copies"] == 2
    # the random tiny model's paraphrases never keep the names: every one is refused, none is written
    assert result["methods"]["paraphrase"] == {"added": 0, "attempted": 6, "skipped": 6}
    assert result["methods"]["synonym"]["added"] > 0
    assert len(json.loads(out.read_text())) == result["total"] == 3 + result["methods"]["synonym"]["added"]
    assert not failed["success"]
    assert "Unknown augmentation method 'paraphrse'. Did you mean 'paraphrase'?" in log  # jaseci logs the message


@pytest.mark.e2e
def test_augment_then_train_walker(tmp_path, tiny_model_dir):
    session = _session(tmp_path)
    session.load_module(ctx={"model_name": str(tiny_model_dir)})
    source = _write(tmp_path / "train.json", RECORDS)
    result, log = session.jac_run("augment_train.jac", ctx={
        "data_file": str(source), "augmented_file": str(tmp_path / "aug.json"), "methods": ["synonym", "shuffle"],
        "output_dir": str(tmp_path / "runs" / "aug"), "eval_file": str(source), "max_steps": 2,
        "training_params": {"MICRO_BATCH_SIZE": 2, "BATCH_SIZE": 2, "CUTOFF_LEN": 64}})
    assert result.get("success"), result.get("errors") or log[-3000:]
    grown, trained, evaluated = result["report"]
    assert grown["total"] > grown["original"] == 3
    assert trained["adapter"] == "aug" and trained["steps"] == 2
    assert evaluated["adapter"] == "aug" and evaluated["records"] == 3 and evaluated["loss"] > 0
