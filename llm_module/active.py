"""Active learning: rank unlabelled records by how unsure the model is of its own answer.

The model answers each prompt greedily; every generated token's distribution gives an
entropy, and the chosen token a log-probability. A record's uncertainty is the mean
token entropy of that answer ("entropy") or the answer's perplexity ("perplexity").
The most uncertain records are the ones a person should label first.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapters import BASE
from .errors import InvalidInput, suggest
from .paths import atomic_write_text
from .prompts import alpaca_prompt, render_prompt, resolve_template, user_content
from .training.data import read_records

STRATEGIES = ("entropy", "perplexity")
PROMPT_KEYS = ("instruction", "prompt", "question", "text", "messages")
OUTPUT_TYPES = (".json", ".jsonl")


@dataclass
class Uncertainty:
    entropy: float  # mean entropy (nats) of the next-token distributions of the greedy answer
    perplexity: float  # exp(mean negative log-probability of the answer's tokens)
    answer: str
    tokens: int

    def score(self, strategy: str) -> float:
        return self.entropy if strategy == "entropy" else self.perplexity


# ---------------------------------------------------------------- prompts
def record_prompt(record: Any, tokenizer, template: str) -> str:
    """The text the model continues from for one unlabelled record (any output in it is ignored)."""
    if isinstance(record, str):
        instruction, input_text, system = record, "", ""
    elif isinstance(record.get("messages"), list):
        turns = [m for m in record["messages"] if isinstance(m, dict) and m.get("role") != "assistant"]
        last_user = max((i for i, m in enumerate(turns) if m.get("role") == "user"), default=None)
        if last_user is None:
            raise ValueError("messages hold no user turn")
        return render_prompt(tokenizer, turns[:last_user + 1], template)
    else:
        key = next((k for k in ("instruction", "prompt", "question", "text") if record.get(k)), None)
        if key is None:
            raise KeyError(f"no prompt text in any of {', '.join(PROMPT_KEYS)}")
        instruction = str(record[key])
        input_text = str(record.get("input") or record.get("context") or "")
        system = str(record.get("system") or "")
    if template == "chat":
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": user_content(instruction, input_text)})
        return render_prompt(tokenizer, messages, "chat")
    return alpaca_prompt(instruction, "\n".join(p for p in (system, input_text) if p))


def read_pool(path: Path) -> list:
    """Unlabelled records: .json/.jsonl/.csv records, or a .txt file with one prompt per line."""
    if path.suffix.lower() == ".txt":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise InvalidInput(f"data_file {path.name!r} is empty; give one prompt per line.")
        return lines
    return read_records(path)


# ---------------------------------------------------------------- scoring
def score_prompts(model, tokenizer, prompts: list[str], *, adapter: str | None = None, multi_adapter: bool = False,
                  max_new_tokens: int = 32, batch_size: int = 8, lock=None) -> list[Uncertainty]:
    """Greedy answers to ``prompts`` with their token entropy and perplexity, ``batch_size`` at a time.

    ``lock`` (the engine's model lock) is held per batch, so generation for others goes on between batches.
    """
    results: list[Uncertainty] = []
    for start in range(0, len(prompts), batch_size):
        with lock if lock is not None else contextlib.nullcontext():
            results += _score_batch(model, tokenizer, prompts[start:start + batch_size], adapter, multi_adapter,
                                    max_new_tokens)
    return results


def _score_batch(model, tokenizer, prompts: list[str], adapter, multi_adapter, max_new_tokens) -> list[Uncertainty]:
    import torch

    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    adapters, extra = contextlib.nullcontext(), {}
    if multi_adapter:
        from .lora_batch import adapter_rows

        adapters, extra = adapter_rows(model, [adapter or BASE] * len(prompts))
    with torch.inference_mode(), adapters:
        out = model.generate(**enc, **extra, do_sample=False, max_new_tokens=max_new_tokens, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    logits = torch.stack(out.logits, dim=1).float()  # (batch, steps, vocab), before any logits processor
    chosen = out.sequences[:, enc["input_ids"].shape[1]:]
    log_probs = torch.log_softmax(logits, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    chosen_log_prob = log_probs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    mask = _answer_mask(chosen, _eos_ids(model, tokenizer))
    results = []
    for row in range(len(prompts)):
        n = int(mask[row].sum())
        mean_entropy = float((entropy[row] * mask[row]).sum()) / n
        mean_nll = -float((chosen_log_prob[row] * mask[row]).sum()) / n
        answer = tokenizer.decode(chosen[row][mask[row].bool()], skip_special_tokens=True).strip()
        results.append(Uncertainty(round(mean_entropy, 5), round(math.exp(min(mean_nll, 50.0)), 5), answer, n))
    return results


def _eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _answer_mask(chosen, eos_ids: set[int]):
    """1 for each token of the answer up to and including its first end-of-sequence token."""
    import torch

    is_eos = torch.zeros_like(chosen, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= chosen == eos
    ended_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return (~ended_before).float()


# -------------------------------------------------------------- selection
def check_selection_args(k: Any, strategy: Any, max_new_tokens: Any, batch_size: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInput(f"k must be a whole number >= 1 (how many records to pick), got {k!r}.")
    if strategy not in STRATEGIES:
        raise InvalidInput(f"strategy {strategy!r} is not known.{suggest(str(strategy), STRATEGIES)} "
                           f"Use one of {', '.join(STRATEGIES)}.")
    for name, value, high in (("max_new_tokens", max_new_tokens, 512), ("batch_size", batch_size, 256)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise InvalidInput(f"{name} must be a whole number from 1 to {high}, got {value!r}.")


def select_informative(model, tokenizer, data_path: Path, k: int, *, strategy: str = "entropy",
                       adapter: str | None = None, multi_adapter: bool = False, output_path: Path | None = None,
                       max_new_tokens: int = 32, batch_size: int = 8, prompt_template: str | None = None,
                       lock=None) -> dict:
    """Score every record of ``data_path`` and return the ``k`` most uncertain, most uncertain first."""
    start = time.perf_counter()
    check_selection_args(k, strategy, max_new_tokens, batch_size)
    if output_path is not None and output_path.suffix.lower() not in OUTPUT_TYPES:
        raise InvalidInput(f"output_file must end in {' or '.join(OUTPUT_TYPES)}, got {output_path.name!r}.")
    try:
        template = resolve_template(tokenizer, prompt_template)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc
    records = read_pool(data_path)
    prompts = []
    for i, record in enumerate(records):
        try:
            prompts.append(record_prompt(record, tokenizer, template))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidInput(f"Record {i} of {data_path.name} has no prompt to score ({exc}); give records with "
                               f"one of {', '.join(PROMPT_KEYS)}, or a .txt file with one prompt per line. "
                               f"The record was {json.dumps(record)[:200]}") from exc
    scores = score_prompts(model, tokenizer, prompts, adapter=adapter, multi_adapter=multi_adapter,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, lock=lock)
    ranked = sorted(range(len(records)), key=lambda i: (-scores[i].score(strategy), i))
    selected = [_selected_item(i, records[i], scores[i], strategy) for i in ranked[:k]]
    all_scores = [s.score(strategy) for s in scores]
    result = {
        "strategy": strategy, "adapter": adapter, "k": len(selected), "scored": len(records),
        "selected": selected,
        "mean_score_selected": _mean([item["score"] for item in selected]),
        "mean_score_all": _mean(all_scores),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if output_path is not None:
        _write_for_labelling(output_path, selected)
        result["output_file"] = str(output_path)
    return result


def _selected_item(index: int, record: Any, score: Uncertainty, strategy: str) -> dict:
    return {"index": index, "score": score.score(strategy), "entropy": score.entropy,
            "perplexity": score.perplexity, "model_answer": score.answer, "record": record}


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 5) if values else None


def _write_for_labelling(path: Path, selected: list[dict]) -> None:
    """Alpaca records with an empty output for a person to fill in; llm.train refuses them until then."""
    rows = []
    for item in selected:
        record = item["record"]
        if isinstance(record, str):
            record = {"instruction": record}
        row = dict(record)
        if "instruction" not in row and "messages" not in row:
            key = next(k for k in ("prompt", "question", "text") if row.get(k))
            row = {"instruction": row.pop(key), "input": "", **{k: v for k, v in row.items() if k != "input"}}
        if "messages" not in row:
            row["output"] = ""
        row.update(model_answer=item["model_answer"], uncertainty=item["score"], pool_index=item["index"])
        rows.append(row)
    if path.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        text = json.dumps(rows, ensure_ascii=False, indent=1) + "\n"
    atomic_write_text(path, text)
