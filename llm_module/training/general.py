"""The forgetting guard: does the model still answer general questions with the new adapter?

A LoRA adapter that learns a catalog can cost the model what it knew: capitals, arithmetic,
science. ``general_questions.json`` holds general questions the default base model answers
right (checked against its greedy answers), each with the substrings a right answer contains.
In the training process, on the private training copy (nothing touches the served model), every
question is answered greedily, in short and in batches: by the plain model before the LoRA layers
go in (the base score), and after training with the adapter active (the adapter score);
``retained`` is adapter score / base score.

The base answers depend only on the base model, so they are kept for the life of the process
(keyed by the model's weights folder, a sample of its weights and the questions): a second run on the same base only
answers with its adapter.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from ..prompts import render_prompt
from .params import DEFAULT_PROTECT_GENERAL, DEFAULTS

log = logging.getLogger(__name__)

QUESTIONS_FILE = Path(__file__).with_name("general_questions.json")
REPLAY_FILE = Path(__file__).with_name("replay_prompts.json")
REPLAY_NEW_TOKENS = 48
MAX_NEW_TOKENS = 16  # the questions are chosen so that a right answer says the fact at once
BATCH_SIZE = 24
LOST_SHOWN = 8  # questions the adapter lost, named in the report
_base_cache: dict[tuple, list[bool]] = {}
_cache_lock = threading.Lock()


def base_identity(model) -> str:
    """Which base model this is ("" when unknown): where its weights came from and a sample of them (a
    model saved over the same path is another model). With its dtype, what a base model's measurements
    are kept under for the process."""
    source = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if not source:
        return ""
    sample = tuple(float(p.detach().reshape(-1)[:16].float().sum()) for p in model.parameters())  # ~5 ms
    return f"{source}#{hash(sample):x}"


def load_questions(path: Path = QUESTIONS_FILE) -> list[dict]:
    """[{"question", "expected": [substrings], "topic"}] from the question file."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [row for row in rows if isinstance(row, dict) and row.get("question") and row.get("expected")]


def is_right(answer: str, expected: list[str]) -> bool:
    text = answer.lower()
    return any(e.lower() in text for e in expected)


def answer_all(model, tokenizer, prompts: list[str], *, max_new_tokens: int = MAX_NEW_TOKENS,
               batch_size: int = BATCH_SIZE) -> list[str]:
    """Greedy answers to rendered prompts, in batches of similar length (left padding)."""
    return [text for text, _ in _generate(model, tokenizer, prompts, max_new_tokens, batch_size)]


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[tuple[str, bool]]:
    """(greedy answer, whether it ended with an end token) for each rendered prompt."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[tuple[str, bool]] = [("", False)] * len(prompts)
    ends = _end_ids(model, tokenizer)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            with torch.inference_mode():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     pad_token_id=tokenizer.pad_token_id)
            new = out[:, batch["input_ids"].shape[1]:]
            for i, ids in zip(chunk, new, strict=True):
                finished = any(int(t) in ends for t in ids)
                answers[i] = (tokenizer.decode(ids, skip_special_tokens=True), finished)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def _end_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
    return {int(i) for i in ids if i is not None}


def replay_examples(model, tokenizer, *, template: str, count: int, seed: int,
                    max_new_tokens: int = REPLAY_NEW_TOKENS) -> list:
    """``count`` general prompts (replay_prompts.json, none of them a question of the check) with the base
    model's own greedy answers, as training examples: mixed into the data, they hold the model to what it
    did on general requests while it learns the new data (self-distillation). Run on the plain model."""
    import random

    from .data import Example

    pool = json.loads(REPLAY_FILE.read_text(encoding="utf-8"))
    chosen = random.Random(seed).sample(pool, min(count, len(pool)))
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": p}], template) for p in chosen]
    answers = _generate(model, tokenizer, prompts, max_new_tokens, BATCH_SIZE)
    # an answer cut at max_new_tokens is learned without an end token, so the model does not learn to stop there
    return [Example(prompt, text, end_with_eos=finished)
            for prompt, (text, finished) in zip(prompts, answers, strict=True) if text.strip()]


def _prompts(tokenizer, questions: list[dict], template: str) -> list[str]:
    return [render_prompt(tokenizer, [{"role": "user", "content": q["question"]}], template) for q in questions]


def base_scores(model, tokenizer, *, template: str = "auto", questions: list[dict] | None = None) -> dict:
    """Which general questions the base model answers right: run on the plain model before LoRA
    layers go in (kept for the process: the base answers depend on the base alone)."""
    start = time.perf_counter()
    questions = questions if questions is not None else load_questions()
    prompts = _prompts(tokenizer, questions, template)
    identity = base_identity(model)
    key = (identity, str(model.dtype), template, tuple(prompts), tuple(tuple(q["expected"]) for q in questions))
    with _cache_lock:
        right = _base_cache.get(key) if identity else None
    if right is None:
        answers = answer_all(model, tokenizer, prompts)
        right = [is_right(a, q["expected"]) for a, q in zip(answers, questions, strict=True)]
        with _cache_lock:
            _base_cache[key] = right
    return {"questions": questions, "prompts": prompts, "right": right,
            "seconds": round(time.perf_counter() - start, 2)}


def general_check(peft_model, tokenizer, base: dict) -> dict:
    """Answer the general questions with the trained adapter active and compare with ``base`` (base_scores).
    The adapter is not merged for the pass: merged into bfloat16 base weights, its small updates would
    be rounded away."""
    start = time.perf_counter()
    questions, prompts = base["questions"], base["prompts"]
    answers = answer_all(peft_model, tokenizer, prompts)
    tuned = [is_right(a, q["expected"]) for a, q in zip(answers, questions, strict=True)]
    base_right, tuned_right = sum(base["right"]), sum(tuned)
    lost = [{"question": q["question"], "answer": a.strip()[:160]}
            for q, a, b, t in zip(questions, answers, base["right"], tuned, strict=True) if b and not t]
    return {
        "questions": len(questions),
        "base_right": base_right,
        "adapter_right": tuned_right,
        "base_score": round(base_right / len(questions), 4) if questions else None,
        "adapter_score": round(tuned_right / len(questions), 4) if questions else None,
        "retained": round(tuned_right / base_right, 4) if base_right else None,
        "lost": lost[:LOST_SHOWN],
        "lost_count": len(lost),
        "seconds": round(base["seconds"] + time.perf_counter() - start, 2),
    }


def forgetting_warning(report: dict, threshold: float) -> str | None:
    retained = report.get("retained")
    if retained is None or retained >= threshold:
        return None
    names = "; ".join(item["question"] for item in report["lost"][:3])
    return (f"The adapter answers {report['adapter_right']} of the {report['base_right']} general questions the base "
            f"model answers right ({retained:.0%} retained; e.g. lost: {names}). It has forgotten some general "
            f"knowledge: keep protect_general on (default {DEFAULT_PROTECT_GENERAL}; a higher share such as 0.995 "
            f"protects more), raise WEIGHT_DECAY (default {DEFAULTS['WEIGHT_DECAY']}; 3 keeps more), train for "
            "fewer EPOCHS or at a lower LEARNING_RATE, or mix general examples into the data with replay=N (the base "
            "model's own answers to N general prompts, up to 48).")
