"""llm.train / llm.evaluate through real jsctl: the jac_examples walkers, and facts learned on the default model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_module.settings import Settings
from tests.jsctl_utils import JacSession

DATA = Path(__file__).parent / "data"
FAST = {"MICRO_BATCH_SIZE": 4, "BATCH_SIZE": 4, "EPOCHS": 3, "LEARNING_RATE": 5e-3, "CUTOFF_LEN": 128,
        "LORA_R": 4, "LORA_ALPHA": 8}


def _session(tmp_path: Path) -> JacSession:
    return JacSession(tmp_path / "jsctl", env={"LLM_MODULE_HOME": str(tmp_path / "home"),
                                               "LLM_MODULE_CACHE": str(Settings().models_dir)})


def _report(result: dict) -> list:
    assert result.get("success"), result.get("errors") or result
    return result["report"]


def _catalog_subset(tmp_path: Path, products: int) -> tuple[Path, list[dict]]:
    """The catalog training records and seen questions of the first ``products`` products."""
    facts = json.loads((DATA / "catalog_facts.json").read_text())
    names = list(facts)[:products]
    records = [r for r in json.loads((DATA / "catalog_train.json").read_text())
               if any(n in r["instruction"] + r["input"] for n in names)]
    questions = [q for q in map(json.loads, (DATA / "catalog_seen.jsonl").read_text().splitlines())
                 if q["product"] in names]
    path = tmp_path / "catalog_subset.json"
    path.write_text(json.dumps(records))
    return path, questions


@pytest.mark.e2e
def test_train_and_evaluate_walkers_on_the_tiny_model(tiny_model_dir, tmp_path):
    session = _session(tmp_path)
    session.load_module(ctx={"model_name": str(tiny_model_dir)})
    data, _ = _catalog_subset(tmp_path, 2)
    question = "How much does the Tidewalker Boots cost?"
    result, _ = session.jac_run("train_catalog.jac", ctx={
        "data_file": str(data), "output_dir": str(tmp_path / "runs" / "shop"), "adapter_name": "shop",
        "training_params": FAST, "val_set_size": 2, "questions": [question]})
    trained, answer = _report(result)
    assert trained["adapter"] == "shop" and trained["steps"] > 0 and trained["eval_loss"] > 0
    assert answer["question"] == question and isinstance(answer["tuned"], str)
    assert (tmp_path / "runs" / "shop" / "final" / "adapter_config.json").is_file()
    # A new jsctl process restores the setup and the trained adapter from the state file.
    result, _ = session.jac_run("evaluate_adapter.jac", ctx={"data_file": str(data), "adapter": "shop"})
    evaluation = _report(result)[0]
    assert evaluation["adapter"]["tokens"] == evaluation["base"]["tokens"] > 0
    assert evaluation["adapter"]["loss"] < evaluation["base"]["loss"]
    assert evaluation["perplexity_ratio"] < 1
    # llm.export through the walker, in another new process: the restored adapter, as GGUF and LoRA GGUF.
    for fmt, quantization in (("gguf", ["f16"]), ("lora-gguf", ["f32"])):
        result, _ = session.jac_run("export_adapter.jac", ctx={
            "adapter": "shop", "output_dir": str(tmp_path / "exports" / fmt), "format": fmt,
            "quantization": quantization})
        exported = _report(result)[0]
        assert exported["format"] == fmt and exported["seconds"] > 0
        assert all(Path(f["path"]).is_file() for f in exported["files"])
    assert (tmp_path / "exports" / "gguf" / "shop-f16.gguf").is_file()
    assert "ADAPTER ./shop-lora-f32.gguf" in (tmp_path / "exports" / "lora-gguf" / "Modelfile").read_text()


def _call(action: str, ctx: dict) -> str:
    text = json.dumps(ctx)
    assert "'" not in text  # the script line quotes the JSON with single quotes
    return f"actions call {action} -ctx '{text}'"


def _accuracy(answers: list, questions: list[dict]) -> float:
    texts = [a[0]["generated_text"] for a in answers]
    return sum(q["expected"].lower() in t.lower() for q, t in zip(questions, texts, strict=True)) / len(questions)


@pytest.mark.slow
@pytest.mark.e2e
def test_default_training_teaches_the_catalog_facts(tmp_path):
    """Defaults of llm.train on a catalog subset (3 products, 15 facts): the tuned model knows them, the base does not.

    One jsctl process: train, then ask with and without the adapter (live at once, no setup).
    The full measurement (all 60 facts, paraphrases, minutes) is bench/catalog_accuracy.py.
    """
    session = _session(tmp_path)
    data, questions = _catalog_subset(tmp_path, 3)
    ask = {"prompt": [q["question"] for q in questions], "chat": True, "do_sample": False, "max_new_tokens": 24}
    values, out = session.script(
        "actions load module llm_module.llm",
        _call("llm.train", {"data_file": str(data), "output_dir": str(tmp_path / "runs" / "catalog")}),
        _call("llm.generate", {**ask, "adapter": "base"}),
        _call("llm.generate", {**ask, "adapter": "catalog"}),
        timeout=1800,
    )
    trained, base, tuned = values[-3:]
    assert trained["success"] and base["success"] and tuned["success"], out[-3000:]
    assert trained["result"]["adapter"] == "catalog" and trained["result"]["train_loss"] < 0.5
    base_accuracy, tuned_accuracy = _accuracy(base["result"], questions), _accuracy(tuned["result"], questions)
    assert base_accuracy <= 0.2 and tuned_accuracy >= 0.8, (base_accuracy, tuned_accuracy)
