"""Active learning: rank unlabelled records by how unsure the model is of its own answer.

The model answers each prompt greedily through the serving core; every generated token's
distribution gives an entropy, and the chosen token a log-probability. A record's uncertainty is the mean
token entropy of that answer ("entropy") or the answer's perplexity ("perplexity").
The most uncertain records are the ones a person should label first.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidInput, suggest
from ..paths import atomic_write_text
from ..prompts import alpaca_prompt, render_prompt, resolve_template, user_content
from ..training.data import read_records

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
def uncertainty(output) -> Uncertainty:
    """A greedy answer's uncertainty from the serving core's output (``RowOutput`` with per-token
    entropies and log-probabilities, taken from the model's own distributions)."""
    n = len(output.token_ids)
    if n == 0:
        return Uncertainty(0.0, 1.0, "", 0)
    mean_entropy = sum(output.entropies) / n
    mean_nll = -sum(logprob for _, logprob, _ in output.logprobs) / n
    return Uncertainty(round(mean_entropy, 5), round(math.exp(min(mean_nll, 50.0)), 5), output.text.strip(), n)


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


def select_informative(score: Callable[[list[str], int], list], tokenizer, data_path: Path, k: int, *,
                       strategy: str = "entropy", adapter: str | None = None, output_path: Path | None = None,
                       max_new_tokens: int = 32, batch_size: int = 8, prompt_template: str | None = None) -> dict:
    """Score every record of ``data_path`` and return the ``k`` most uncertain, most uncertain first.

    ``score(prompts, max_new_tokens)`` answers prompts greedily with per-token entropies and
    log-probabilities (the serving core, with the adapter chosen); ``batch_size`` prompts go at a time.
    """
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
    scores = [uncertainty(output) for start in range(0, len(prompts), batch_size)
              for output in score(prompts[start:start + batch_size], max_new_tokens)]
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
