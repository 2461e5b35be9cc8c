"""llm.train / llm.evaluate on the tiny random Llama: formats, labels, guards, outputs, cancel, resume, jobs."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest

from llm_module.errors import Conflict, InvalidInput
from llm_module.loader import load_model
from llm_module.prompts import render_prompt
from llm_module.settings import Settings
from llm_module.training import check_output_dir, train_adapter
from llm_module.training.data import Example, detect_format, load_examples, tokenize_examples
from llm_module.training.params import SEED_DEFAULTS, plan_steps, resolve_params
from llm_module.training.prompt_dropout import PromptDropout, keep_names

DATA = Path(__file__).parent / "data"
FAST = {"MICRO_BATCH_SIZE": 4, "BATCH_SIZE": 4, "EPOCHS": 1, "LEARNING_RATE": 5e-3, "CUTOFF_LEN": 128,
        "LORA_R": 4, "LORA_ALPHA": 8}

ALPACA = [{"instruction": f"What is the code of item {i}?", "input": "", "output": f"Item {i} has code Z{i}."}
          for i in range(8)]
RECORDS = {
    "alpaca": ALPACA,
    "dolly": [{"instruction": r["instruction"], "context": "Catalog", "response": r["output"], "category": "qa"}
              for r in ALPACA],
    "chat": [{"messages": [{"role": "user", "content": r["instruction"]},
                           {"role": "assistant", "content": r["output"]}]} for r in ALPACA],
    "sharegpt": [{"conversations": [{"from": "human", "value": r["instruction"]},
                                    {"from": "gpt", "value": r["output"]}]} for r in ALPACA],
    "text": [{"text": f"{r['instruction']} {r['output']}"} for r in ALPACA],
}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_model(str(tiny_model_dir), models_dir=Settings().models_dir).tokenizer


def run_training(model_dir: Path, data_file: Path, output_dir: Path, params: dict | None = None, *,
                 cancel_at_step: int | None = None, **kwargs) -> tuple[dict, list[dict]]:
    """train_adapter on a fresh tiny model; ``cancel_at_step`` sets the cancel event once that step is reported."""
    loaded = load_model(str(model_dir), models_dir=Settings().models_dir)
    cancel, reports = threading.Event(), []

    def progress(report: dict) -> None:
        reports.append(dict(report))
        if cancel_at_step is not None and (report.get("step") or 0) >= cancel_at_step:
            cancel.set()

    resume = kwargs.pop("resume", False)
    result = train_adapter(loaded.model, loaded.tokenizer, data_file=data_file, output_dir=output_dir,
                           training_params={**FAST, **(params or {})}, resume_from_checkpoint=resume,
                           progress=progress, cancel=cancel, base_model_name="tiny", show_progress=False, **kwargs)
    return result, reports


def digest(folder: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            sha.update(path.name.encode() + path.read_bytes())
    return sha.hexdigest()


# ------------------------------------------------------------------ data
@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_format_is_detected_from_the_records(fmt):
    assert detect_format(RECORDS[fmt]) == ("text" if fmt == "text" else fmt)


def test_chat_prompt_is_what_generation_sees_and_only_the_response_is_learned(tokenizer, tmp_path):
    rows, summary = load_examples(write_jsonl(tmp_path / "a.jsonl", ALPACA[:1]), tokenizer, data_format=None,
                                  prompt_template=None, cutoff_len=256, train_on_inputs=False)
    assert summary["prompt_template"] == "chat"
    prompt = render_prompt(tokenizer, [{"role": "user", "content": ALPACA[0]["instruction"]}])
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    row = rows[0]
    assert row.input_ids[:len(prompt_ids)] == prompt_ids
    assert row.labels[:len(prompt_ids)] == [-100] * len(prompt_ids)
    response = tokenizer.decode(row.labels[len(prompt_ids):-1])
    assert response == ALPACA[0]["output"]
    assert row.input_ids[-1] == row.labels[-1] == tokenizer.eos_token_id  # the tuned model learns to stop


def test_train_on_inputs_and_alpaca_template(tokenizer, tmp_path):
    rows, summary = load_examples(write_jsonl(tmp_path / "a.jsonl", ALPACA[:1]), tokenizer, data_format="alpaca",
                                  prompt_template="alpaca", cutoff_len=256, train_on_inputs=True)
    assert summary["prompt_template"] == "alpaca"
    assert rows[0].labels == rows[0].input_ids
    assert tokenizer.decode(rows[0].input_ids).startswith("Below is an instruction")


def _droppable_text(tokenizer, row) -> str:
    return tokenizer.decode([row.input_ids[p] for p in row.droppable])


def test_prompt_dropout_may_drop_the_users_words_and_nothing_else(tokenizer, tmp_path):
    record = {"instruction": "You answer for the shop.", "input": "What does the Alder Kettle cost?",
              "output": "The Alder Kettle costs $42.", "system": "Be brief."}
    for template in ("chat", "alpaca"):
        rows, _ = load_examples(write_jsonl(tmp_path / "r.jsonl", [record]), tokenizer, data_format="alpaca",
                                prompt_template=template, cutoff_len=256, train_on_inputs=False)
        row = rows[0]
        words = _droppable_text(tokenizer, row)
        assert "Alder Kettle cost" in words and "You answer for the shop" in words
        assert "Be brief" not in words and "$42" not in words  # not the system text, never the response
        assert all(row.labels[p] == -100 for p in row.droppable)
        assert "<|im_start|>" not in words and "### " not in words and "Below is" not in words  # template kept
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Price of X9?"},
                         {"role": "assistant", "content": "It is $3."}, {"role": "user", "content": "And Y7?"},
                         {"role": "assistant", "content": "It is $5."}]}
    rows, _ = load_examples(write_jsonl(tmp_path / "c.jsonl", [chat]), tokenizer, data_format=None,
                            prompt_template=None, cutoff_len=256, train_on_inputs=False)
    words = _droppable_text(tokenizer, rows[0])
    assert "X9" in words and "Y7" in words and "brief" not in words and "$3" not in words
    text, _ = load_examples(write_jsonl(tmp_path / "t.jsonl", RECORDS["text"][:1]), tokenizer, data_format=None,
                            prompt_template=None, cutoff_len=256, train_on_inputs=False)
    assert text[0].droppable == ()  # raw text has no prompt to drop from


def test_prompt_dropout_is_fixed_by_seed_epoch_and_row_and_keeps_the_response(tokenizer, tmp_path):
    record = {"instruction": "Which platform does the Copperline night train to Ostrana leave from today?",
              "input": "", "output": "The Copperline leaves from platform 4."}
    row = load_examples(write_jsonl(tmp_path / "r.jsonl", [record]), tokenizer, data_format=None,
                        prompt_template=None, cutoff_len=256, train_on_inputs=False)[0][0]
    dropout = PromptDropout(0.3, seed=5)
    first = dropout.apply(row, 0)
    assert dropout.apply(row, 0) == first  # the same seed, epoch and row: the same drops
    assert len(row) - len(row.droppable) < len(first) < len(row)
    response = [label for label in row.labels if label != -100]
    assert [label for label in first.labels if label != -100] == response  # the answer is learned whole
    assert first.input_ids[-len(response):] == row.input_ids[-len(response):]
    others = {tuple(dropout.apply(row, 1).input_ids), tuple(PromptDropout(0.3, seed=6).apply(row, 0).input_ids)}
    dropout.epoch = 1
    others.add(tuple(dropout.apply(row, 0).input_ids))
    assert tuple(first.input_ids) not in others  # another row, seed or epoch draws other drops
    assert PromptDropout(0.0, seed=5).apply(row, 0) is row
    assert len(PromptDropout(0.99, seed=5).apply(row, 0)) >= len(row) - len(row.droppable) + 1  # a word stays


def test_prompt_dropout_drops_only_the_words_many_prompts_share(tokenizer, tmp_path):
    names = ["Alder Kettle", "Birch Lamp", "Cedar Stool", "Dunmore Rug", "Elm Crate", "Fennick Vase"]
    records = [{"instruction": f"How much does the {name} cost?", "input": "", "output": f"It costs ${i}."}
               for i, name in enumerate(names)]
    rows, _ = load_examples(write_jsonl(tmp_path / "r.jsonl", records), tokenizer, data_format=None,
                            prompt_template=None, cutoff_len=256, train_on_inputs=False)
    kept = keep_names(rows, share=0.5)
    for row, before, name in zip(kept, rows, names, strict=True):
        assert row.input_ids == before.input_ids and row.labels == before.labels
        assert set(row.droppable) < set(before.droppable)
        words = _droppable_text(tokenizer, row)
        assert "much" in words and "cost" in words  # the question's wording, in every prompt, may go
        assert all(part not in words for part in name.split())  # a name, in one prompt alone, stays
    assert keep_names(rows, share=0.0) == rows  # share 0: every word of the prompt may be dropped


def test_long_text_is_cut_into_overlapping_windows(tokenizer):
    text = " ".join(f"word{i}" for i in range(400))
    rows, _ = tokenize_examples([Example("", text, end_with_eos=False)], tokenizer, cutoff_len=64,
                                train_on_inputs=False, chunk_text=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(rows) > 2 and all(len(r) == 64 for r in rows[:-1])
    assert rows[0].input_ids == ids[:64] and rows[-1].input_ids[-1] == ids[-1]  # nothing lost at either end
    second_start = ids.index(rows[1].input_ids[0], 1)
    assert second_start < 64  # windows overlap


def test_csv_and_txt_files_load(tokenizer, tmp_path):
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("instruction,input,output\nSay hi,,Hi there.\nSay bye,,Bye now.\n")
    rows, summary = load_examples(csv_file, tokenizer, data_format=None, prompt_template=None, cutoff_len=64,
                                  train_on_inputs=False)
    assert summary["data_format"] == "alpaca" and len(rows) == 2
    txt = tmp_path / "book.txt"
    txt.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    rows, summary = load_examples(txt, tokenizer, data_format=None, prompt_template=None, cutoff_len=64,
                                  train_on_inputs=False)
    assert summary["data_format"] == "text" and len(rows) > 5 and all(len(r) <= 64 for r in rows)


def test_bad_records_are_refused_with_the_record_named(tokenizer, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ALPACA[:2] + [{"instruction": "x"}])
    with pytest.raises(InvalidInput, match="Record 2"):
        load_examples(bad, tokenizer, data_format="alpaca", prompt_template=None, cutoff_len=64, train_on_inputs=False)
    with pytest.raises(InvalidInput, match="Cannot tell the data format"):
        load_examples(write_jsonl(tmp_path / "x.jsonl", [{"q": 1}]), tokenizer, data_format=None,
                      prompt_template=None, cutoff_len=64, train_on_inputs=False)


# ---------------------------------------------------------------- params
def test_prompt_dropout_is_a_share_below_one():
    assert resolve_params({}).PROMPT_DROPOUT == 0.0  # opt-in: it helps some data and hurts other (findings.md)
    assert resolve_params({"PROMPT_DROPOUT": 0.15}).PROMPT_DROPOUT == 0.15
    for bad in (1, 1.5, -0.1, "0.1", True):
        with pytest.raises(InvalidInput, match=r"PROMPT_DROPOUT must be a number in \[0, 1\) \(0: off\)"):
            resolve_params({"PROMPT_DROPOUT": bad})


def test_weight_decay_is_a_non_negative_number():
    assert resolve_params({}).WEIGHT_DECAY == 1.0
    assert resolve_params({"WEIGHT_DECAY": 0}).WEIGHT_DECAY == 0.0
    for bad in (-0.1, "1", True, None):
        with pytest.raises(InvalidInput, match=r"WEIGHT_DECAY must be a number >= 0 \(0: off\)"):
            resolve_params({"WEIGHT_DECAY": bad})


def test_weight_decay_shrinks_what_the_data_does_not_hold_up(tiny_model_dir, tmp_path):
    """The same run with and without decay: both halves of the decayed adapter are smaller (lora_A,
    random at the start and barely moved by 4 steps' gradients, by more than 1 %)."""
    import torch
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    norms = {}
    for decay in (0.0, 3.0):
        out = tmp_path / f"wd{decay}"
        result, _ = run_training(tiny_model_dir, data, out, {"EPOCHS": 2, "WEIGHT_DECAY": decay}, seed=5,
                                 check_forgetting=False, protect_general=0)
        assert result["params"]["WEIGHT_DECAY"] == decay
        weights = load_file(str(Path(result["adapter_dir"]) / "adapter_model.safetensors"))
        norms[decay] = {part: torch.cat([w.flatten() for k, w in weights.items() if part in k]).norm().item()
                        for part in ("lora_A", "lora_B")}
    assert norms[3.0]["lora_A"] < 0.99 * norms[0.0]["lora_A"]
    assert norms[3.0]["lora_B"] < norms[0.0]["lora_B"]


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_response_loss_is_the_full_cross_entropy_and_honours_label_smoothing(tiny_model_dir, tmp_path, smoothing):
    """The loss on the labelled positions alone equals cross-entropy over the full logits, smoothed as asked."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, TrainingArguments

    from llm_module.training.loss import ResponseLossTrainer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaked predictions (a random model's are near uniform): smoothing shows
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                             label_smoothing_factor=smoothing)
    trainer = ResponseLossTrainer(model=model, args=args)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[0, 7:], labels[1, 5:10] = ids[0, 7:], ids[1, 5:10]  # responses at different places
    with torch.no_grad():
        loss = trainer.compute_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                            "labels": labels})
        logits = model(input_ids=ids).logits[:, :-1]
        expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100, label_smoothing=smoothing)
        plain = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    if smoothing:
        assert abs(loss.item() - plain.item()) > 1e-3 * plain.item()  # the factor is not dropped


def test_seed_recipe_on_small_data_is_adjusted_and_explained():
    plan = plan_steps(resolve_params(SEED_DEFAULTS), n_train=10)
    assert plan.accumulation == 1 and plan.steps_per_epoch == 3  # not one step per epoch
    assert plan.warmup_steps < plan.total_steps  # the learning rate leaves 0
    text = " ".join(plan.warnings)
    assert "BATCH_SIZE 128 is too large" in text and "WARMUP_STEPS 20" in text and "LEARNING_RATE 2e-05" in text


def test_unknown_keys_are_refused_with_suggestions(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    with pytest.raises(InvalidInput, match="'EPOCHS'"):
        run_training(tiny_model_dir, data, tmp_path / "o", {"EPOCH": 2})
    with pytest.raises(InvalidInput, match="'val_set_size'"):
        run_training(tiny_model_dir, data, tmp_path / "o", val_set_sise=2)
    with pytest.raises(InvalidInput, match="'learning_rate'"):
        run_training(tiny_model_dir, data, tmp_path / "o", training_args_kwargs={"learning_rat": 1e-3})


def test_output_dir_of_other_files_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(Conflict, match="not a previous llm.train run"):
        check_output_dir(tmp_path / "mine", False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "training_log.json").write_text("{}")
    check_output_dir(tmp_path / "run", True)
    check_output_dir(tmp_path / "new", False)


# -------------------------------------------------------------- training
@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_each_format_trains_and_loads_with_plain_peft(fmt, tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / f"{fmt}.jsonl", RECORDS[fmt])
    result, reports = run_training(tiny_model_dir, data, tmp_path / "out", val_set_size=2)
    assert not result["cancelled"] and result["steps"] == 2 and result["params"]["data_format"] == fmt
    # chat rows all start with the template's system turn, run once a step (shared_start.py); raw text has none
    assert (result["params"]["shared_start_tokens"] >= 8) == (fmt != "text"), result["params"]
    assert result["train_tokens"] > 0 and result["eval_loss"] > 0 and result["perplexity"] > 1
    assert reports[-1]["state"] == "done" and any(r.get("loss") for r in reports)
    final = Path(result["adapter_dir"])
    assert json.loads((final / "llm_module.json").read_text())["base_model"] == "tiny"
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tuned = PeftModel.from_pretrained(base, str(final))
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_b and any(torch.count_nonzero(p) for p in lora_b)  # the adapter learned something


def test_run_writes_log_curve_checkpoints_and_honours_overrides(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    out = tmp_path / "out"
    result, _ = run_training(tiny_model_dir, data, out, {"EPOCHS": 2},
                             training_args_kwargs={"lr_scheduler_type": "constant", "warmup_steps": 0},
                             lora_config_kwargs={"target_modules": ["q_proj", "v_proj"]})
    log = json.loads((out / "training_log.json").read_text())
    assert [s["step"] for s in log["steps"]] == [1, 2, 3, 4]
    assert {s["learning_rate"] for s in log["steps"]} == {FAST["LEARNING_RATE"]}  # constant: override won
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    config = json.loads((Path(result["adapter_dir"]) / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_frozen_base_trains_in_bf16_where_the_cpu_has_it_and_the_adapter_stays_float32(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    auto, _ = run_training(tiny_model_dir, data, tmp_path / "auto")
    expected = "bfloat16" if torch.cpu._is_avx512_bf16_supported() else "float32"
    assert auto["params"]["base_dtype"] == expected
    assert auto["params"]["autocast"] == ("bfloat16" if expected == "bfloat16" else None)
    assert auto["params"]["attention"] == "eager"  # on CPU in any dtype: SDPA's backward is the slower there
    assert auto["general"] is not None  # the check generated with the trained copy: peft casts inputs again
    weights = load_file(str(Path(auto["adapter_dir"]) / "adapter_model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}  # LoRA's own weights learn in float32
    kept, _ = run_training(tiny_model_dir, data, tmp_path / "fp32", base_dtype="float32")
    assert kept["params"]["base_dtype"] == "float32" and kept["params"]["autocast"] is None
    with pytest.raises(InvalidInput, match="base_dtype must be one of auto, float32, bfloat16"):
        run_training(tiny_model_dir, data, tmp_path / "bad", base_dtype="fp8")


def test_cancel_stops_cleanly_and_keeps_the_previous_final(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    out = tmp_path / "out"
    first, _ = run_training(tiny_model_dir, data, out)
    before = digest(out / "final")
    second, reports = run_training(tiny_model_dir, data, out, {"EPOCHS": 3}, cancel_at_step=2)
    assert second["cancelled"] and second["adapter_dir"] is None
    assert second["steps"] == 2 < second["total_steps"] == 6
    assert reports[-1]["state"] == "cancelled"
    assert digest(out / "final") == before  # the last good adapter is untouched


def test_resume_continues_from_the_last_complete_checkpoint(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    out = tmp_path / "out"
    stopped, _ = run_training(tiny_model_dir, data, out, {"EPOCHS": 3}, cancel_at_step=3)
    assert stopped["cancelled"] and (out / "checkpoint-3" / "optimizer.pt").is_file()
    broken = out / "checkpoint-5"  # what a kill -9 during a checkpoint write leaves: no trainer_state.json
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes(b"half")
    resumed, _ = run_training(tiny_model_dir, data, out, {"EPOCHS": 3}, resume=True)
    assert resumed["resumed_from"] == str(out / "checkpoint-3")
    assert resumed["started_at_step"] == 3  # it trained steps 4-6 only
    assert any("incomplete checkpoint" in w for w in resumed["warnings"])
    assert resumed["steps"] == 6 and not resumed["cancelled"] and Path(resumed["adapter_dir"]).is_dir()
    steps = [s["step"] for s in json.loads((out / "training_log.json").read_text())["steps"]]
    assert steps == [1, 2, 3, 4, 5, 6]  # the step count continued; nothing was trained twice
    assert resumed["train_tokens"] > stopped["train_tokens"]


# -------------------------------------------------------- engine and jobs
def test_evaluate_base_and_adapters_through_the_engine(engine, tmp_path):
    data = str(write_jsonl(tmp_path / "d.jsonl", ALPACA))
    base = engine.evaluate(data)
    first = engine.train(data, str(tmp_path / "first"), {**FAST, "EPOCHS": 3}, show_progress=False)
    assert first["adapter"] == "first" and engine.generate("hi", adapter="first", max_new_tokens=2)
    engine.train(data, str(tmp_path / "second"), {**FAST, "LEARNING_RATE": 1e-4}, show_progress=False)
    tuned = engine.evaluate(data, adapter="first")
    other = engine.evaluate(data, adapter="second")
    assert tuned["tokens"] == base["tokens"] > 0 and tuned["records"] == len(ALPACA)
    assert tuned["loss"] < other["loss"] < base["loss"]  # each adapter is measured with its own weights
    assert engine.evaluate(data, adapter="base")["loss"] == pytest.approx(base["loss"], rel=1e-5)
    with pytest.raises(InvalidInput, match="'batch_size'"):
        engine.evaluate(data, batch_sise=2)


def test_background_train_refuses_bad_settings_before_a_job_starts(engine, tmp_path):
    """A setting llm.train would refuse inside the job is refused by the call itself: no job, no folder."""
    data = str(write_jsonl(tmp_path / "d.jsonl", ALPACA))
    bad = [({"lora_config_kwargs": {"init_lora_weights": "pissa"}}, "rewrites the base model's weights"),
           ({"val_set_sise": 2}, "val_set_size"), ({"training_params": {"EPOCHS": 0}}, "EPOCHS")]
    jobs_before = engine.list_jobs()
    for extra, phrase in bad:
        with pytest.raises(InvalidInput, match=phrase):
            engine.train(data, str(tmp_path / "never"), background=True, **extra)
    assert engine.list_jobs() == jobs_before and not (tmp_path / "never").exists()


def test_dora_trains_and_serves_over_unpacked_weights_and_is_refused_up_front_over_packed(engine, tiny_model_dir,
                                                                                        tmp_path):
    """The DoRA round trip: over packed int4 weights its adapter could not load, so llm.train refuses it first."""
    from llm_module.engine import Engine
    from llm_module.engine.state import StateFile

    data = str(write_jsonl(tmp_path / "d.jsonl", ALPACA))
    dora = {"lora_config_kwargs": {"use_dora": True}, "training_args_kwargs": {"max_steps": 2}}
    result = engine.train(data, str(tmp_path / "dora"), FAST, **dora)
    assert result["adapter"] == "dora" and engine.generate("hello", adapter="dora", max_new_tokens=3)
    assert json.loads((Path(result["adapter_dir"]) / "adapter_config.json").read_text())["use_dora"] is True
    packed = Engine(state_file=StateFile(tmp_path / "packed.json"))
    try:
        packed.setup(str(tiny_model_dir), quantize="int4")
        jobs_before = packed.list_jobs()
        with pytest.raises(InvalidInput, match=r"full-precision weights.*quantize='none'"):
            packed.train(data, str(tmp_path / "never"), FAST, background=True, **dora)
        assert packed.list_jobs() == jobs_before and not (tmp_path / "never").exists()
    finally:
        packed.close()


def test_background_job_reports_progress_serves_meanwhile_and_cancels(engine, tmp_path):
    data = str(write_jsonl(tmp_path / "d.jsonl", ALPACA * 8))
    started = engine.train(data, str(tmp_path / "bg"), {**FAST, "EPOCHS": 20}, background=True)
    job_id = started["job_id"]
    deadline = time.monotonic() + 120
    while (engine.job_status(job_id)["progress"].get("step") or 0) < 2:
        assert time.monotonic() < deadline, engine.job_status(job_id)
        time.sleep(0.2)
    status = engine.job_status(job_id)
    progress = status["progress"]
    assert status["state"] == "running" and progress["total_steps"] == 320
    assert progress["tokens_per_s"] > 0 and progress["eta_s"] > 0 and progress["loss"] is not None
    assert engine.generate("hello", max_new_tokens=3)  # the base model keeps answering
    assert job_id in [j["job_id"] for j in engine.list_jobs()]
    engine.cancel_job(job_id)
    engine.jobs.wait(job_id, timeout=120)
    final = engine.job_status(job_id)
    assert final["state"] == "cancelled" and final["result"]["cancelled"]
    assert not (tmp_path / "bg" / "final").exists() and "bg" not in [a["name"] for a in engine.list_adapters()]


# ------------------------------------------------- forgetting guard and replay (issue 22)
def test_general_questions_are_a_fixed_set_with_expected_answers():
    from llm_module.training.general import load_questions

    questions = load_questions()
    assert len(questions) >= 40 and len({q["question"] for q in questions}) == len(questions)
    assert {q["topic"] for q in questions} >= {"capital", "arithmetic", "science", "instruction"}
    assert all(isinstance(q["expected"], list) and q["expected"] for q in questions)


def test_forgetting_check_reports_the_retained_share_and_warns(tiny_model_dir, tmp_path, monkeypatch):
    """Questions the tiny base answers 'right' by construction (its own greedy answers); a strong adapter
    changes them: the result and training_log.json say how many it kept, and a warning names the loss."""
    from llm_module.training import general

    loaded = load_model(str(tiny_model_dir), models_dir=Settings().models_dir)
    prompts = ["Name a colour.", "Say something.", "What is up?", "Tell me a word."]
    rendered = general._prompts(loaded.tokenizer, [{"question": p} for p in prompts], "chat")
    base_answers = general.answer_all(loaded.model, loaded.tokenizer, rendered)
    questions = [{"question": p, "expected": [a[:12]], "topic": "test"}
                 for p, a in zip(prompts, base_answers, strict=True)]
    monkeypatch.setattr(general, "load_questions", lambda path=None: questions)
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    out = tmp_path / "out"
    result, reports = run_training(tiny_model_dir, data, out, {"EPOCHS": 4, "LEARNING_RATE": 3e-2},
                                   check_forgetting=True, protect_general=0)  # an adapter that forgets
    general_report = result["general"]
    assert general_report["questions"] == 4 and general_report["base_right"] == 4
    assert general_report["retained"] == result["general_retained"] < 0.9
    assert any("general questions" in w for w in result["warnings"])
    assert any(r.get("state") == "checking general knowledge" for r in reports)
    logged = json.loads((out / "training_log.json").read_text())["result"]
    assert logged["general_retained"] == result["general_retained"]
    meta = json.loads((Path(result["adapter_dir"]) / "llm_module.json").read_text())
    assert meta["general_retained"] == result["general_retained"]
    skipped, _ = run_training(tiny_model_dir, data, tmp_path / "off", check_forgetting=False)
    assert skipped["general"] is None and skipped["general_retained"] is None


def _protected_share(adapter_dir: Path, subspaces: dict) -> float:
    """The largest share of a lora_A's norm that lies in its layer's protected subspace."""
    from safetensors.torch import load_file

    worst = 0.0
    for key, a in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        if ".lora_A." not in key:
            continue
        basis, inside = subspaces[key.removeprefix("base_model.model.").split(".lora_A.")[0]]
        a = a.float()
        part = a @ basis @ basis.T if inside else a - a @ basis @ basis.T
        worst = max(worst, float(part.norm() / a.norm()))
    return worst


def test_protect_general_keeps_the_adapter_out_of_what_general_prompts_use(tiny_model_dir, tmp_path):
    """By default every lora_A ends orthogonal to the directions that hold 99 % of the general prompts'
    input energy at its layer (so B A x ~ 0 for them); with protect_general=0 it does not."""
    from llm_module.training import protect
    from llm_module.training.params import DEFAULT_PROTECT_GENERAL

    loaded = load_model(str(tiny_model_dir), models_dir=Settings().models_dir)
    texts = protect.general_prompts(loaded.tokenizer, "chat")
    subspaces = protect.input_subspaces(loaded.model, loaded.tokenizer, texts, DEFAULT_PROTECT_GENERAL)
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    same = {"check_forgetting": False, "base_dtype": "float32"}  # the subspaces above were measured in float32
    protect._kept.clear()  # earlier tests' runs on the tiny model: this one measures
    guarded, reports = run_training(tiny_model_dir, data, tmp_path / "on", {"EPOCHS": 3}, **same)
    assert guarded["params"]["protect_general"] == DEFAULT_PROTECT_GENERAL == 0.99
    assert guarded["params"]["protect_seconds"] > 0 and not guarded["params"]["protect_reused"]
    low, high = guarded["params"]["protected_dims"]
    assert 0 < low <= high <= 0.75 * 128  # a quarter of each layer stays free (protect.MAX_PROTECTED)
    assert any(r.get("state") == "measuring general inputs" for r in reports)
    assert _protected_share(Path(guarded["adapter_dir"]), subspaces) < 1e-3
    again, _ = run_training(tiny_model_dir, data, tmp_path / "again", {"EPOCHS": 3}, **same)
    assert again["params"]["protect_reused"] and again["params"]["protected_dims"] == [low, high]
    assert _protected_share(Path(again["adapter_dir"]), subspaces) < 1e-3  # kept from the run before, still right
    free, _ = run_training(tiny_model_dir, data, tmp_path / "off", {"EPOCHS": 3}, protect_general=0, **same)
    assert free["params"]["protect_general"] == 0 and "protect_seconds" not in free["params"]
    assert _protected_share(Path(free["adapter_dir"]), subspaces) > 0.3
    for bad in (1, 1.5, -0.1, "high"):
        with pytest.raises(InvalidInput, match="protect_general"):
            run_training(tiny_model_dir, data, tmp_path / "bad", protect_general=bad)


def test_protected_subspaces_are_kept_for_the_same_base_model_only(tiny_model_dir):
    import torch

    from llm_module.training import protect

    loaded = load_model(str(tiny_model_dir), models_dir=Settings().models_dir)
    first, _ = protect.general_subspaces(loaded.model, loaded.tokenizer, "chat", 0.99)
    again, reused = protect.general_subspaces(loaded.model, loaded.tokenizer, "chat", 0.99)
    assert reused["reused"] and again is first
    assert not protect.general_subspaces(loaded.model, loaded.tokenizer, "chat", 0.95)[1]["reused"]
    with torch.no_grad():  # the same path holding other weights (a model saved over it) is another model
        next(loaded.model.parameters()).view(-1)[0] += 1.0
    assert not protect.general_subspaces(loaded.model, loaded.tokenizer, "chat", 0.99)[1]["reused"]


def test_the_protect_prompts_are_general_and_none_is_a_question_of_the_check():
    from llm_module.training import protect
    from llm_module.training.general import load_questions

    pool = [p for path in protect.PROMPT_FILES for p in json.loads(path.read_text())]
    checked = {q["question"].strip().lower() for q in load_questions()}
    assert len(pool) >= 100 and len(set(pool)) == len(pool)
    assert not [p for p in pool if p.strip().lower() in checked]


def test_replay_mixes_the_base_models_own_answers_into_the_data(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    result, _ = run_training(tiny_model_dir, data, tmp_path / "out", replay=4, check_forgetting=False)
    assert result["params"]["replay_examples"] == 4 and result["params"]["train_examples"] == len(ALPACA)
    assert result["steps"] == 3  # (8 + 4) examples / micro-batch 4
    with pytest.raises(InvalidInput, match="replay"):
        run_training(tiny_model_dir, data, tmp_path / "bad", replay=-1)
