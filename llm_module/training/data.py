"""Training data: reading files, detecting their format, and turning records into token ids.

Every supported record becomes an ``Example``: the prompt text the model continues from
(rendered with the same functions ``generate(chat=True)`` uses) and the response it
should learn. Raw text has no prompt: the whole text is the response.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidInput, suggest
from ..prompts import alpaca_prompt, render_prompt, resolve_template, user_content

FORMATS = ("auto", "alpaca", "dolly", "chat", "sharegpt", "text")
FILE_TYPES = (".json", ".jsonl", ".txt", ".csv")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
# Raw .txt files are cut into windows of CUTOFF_LEN tokens that overlap by this fraction,
# so no sentence is only ever seen cut in half.
TEXT_OVERLAP = 0.125


@dataclass
class Example:
    prompt: str  # what the model reads before answering ('' for raw text)
    response: str  # what the model learns to write
    end_with_eos: bool = True  # so a tuned model learns to stop
    user_texts: tuple[str, ...] = ()  # the user's words inside the prompt, in order: what PROMPT_DROPOUT may drop


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken
    droppable: tuple[int, ...] = ()  # positions of the user's words (prompt_dropout.py); never template tokens

    def __len__(self) -> int:
        return len(self.input_ids)


# ------------------------------------------------------------------ reading
def read_records(path: Path) -> list[dict] | str:
    """The records of a .json/.jsonl/.csv file, or the whole text of a .txt file."""
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise InvalidInput(
            f"data_file {path.name!r} has an unsupported type {suffix or '(none)'}; "
            f"use one of {', '.join(FILE_TYPES)}."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"Could not read data_file {str(path)!r} ({exc}); give a UTF-8 text file.") from exc
    if suffix == ".txt":
        if not text.strip():
            raise InvalidInput(f"data_file {str(path)!r} is empty; give some text to train on.")
        return text
    records = _parse_records(text, suffix, path)
    if not records:
        raise InvalidInput(f"data_file {str(path)!r} holds no records; give at least one example.")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise InvalidInput(f"Record {i} of {path.name} is {type(record).__name__}, not an object; "
                               "each record must be a JSON object such as {\"instruction\": ..., \"output\": ...}.")
    return records


def _parse_records(text: str, suffix: str, path: Path) -> list:
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if suffix == ".jsonl":
        records = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError as exc:
                    raise InvalidInput(f"{path.name} line {line_no} is not valid JSON ({exc}); fix that line.") from exc
        return records
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"{path.name} is not valid JSON ({exc}); a .json data file holds an array of "
                           "records (use .jsonl for one record per line).") from exc
    if not isinstance(data, list):
        raise InvalidInput(f"{path.name} holds a JSON {type(data).__name__}; it must be an array of records.")
    return data


# ----------------------------------------------------------------- formats
def detect_format(records: list[dict] | str) -> str:
    """The data format of the records, from the keys of the first one."""
    if isinstance(records, str):
        return "text"
    keys = set(records[0])
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "response"} <= keys:
        return "dolly"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    raise InvalidInput(
        f"Cannot tell the data format from the keys {sorted(keys)}. Records need instruction/input/output "
        "(Alpaca), instruction/context/response (Dolly), messages (chat), conversations (ShareGPT) "
        "or text (raw text); or pass data_format=..."
    )


def check_format(data_format: str | None, records: list[dict] | str) -> str:
    data_format = data_format or "auto"
    if data_format not in FORMATS:
        raise InvalidInput(f"data_format {data_format!r} is not known.{suggest(data_format, FORMATS)} "
                           f"Use one of {', '.join(FORMATS)}.")
    if data_format == "auto":
        return detect_format(records)
    if isinstance(records, str) and data_format != "text":
        raise InvalidInput(f"A .txt file is raw text; data_format={data_format!r} needs .json/.jsonl/.csv records.")
    return data_format


def to_examples(records: list[dict] | str, data_format: str, tokenizer, template: str) -> list[Example]:
    """Turn records into prompt/response pairs in the prompt format ``template`` ('chat' or 'alpaca')."""
    if isinstance(records, str):
        return [Example("", records, end_with_eos=False)]
    convert = {"alpaca": _from_alpaca, "dolly": _from_dolly, "chat": _from_messages,
               "sharegpt": _from_sharegpt, "text": _from_text}[data_format]
    examples = []
    for i, record in enumerate(records):
        try:
            examples.append(convert(record, tokenizer, template))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"Record {i} does not fit the {data_format} format ({type(exc).__name__}: {exc}); "
                               f"fix that record or pass the right data_format. The record was "
                               f"{json.dumps(record)[:300]}") from exc
    return examples


def _field(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None or value == "":
        if required:
            raise KeyError(f"missing or empty {key!r}")
        return ""
    if not isinstance(value, str):
        raise TypeError(f"{key!r} must be a string, got {type(value).__name__}")
    return value


def _instruction_example(instruction: str, input_text: str, response: str, tokenizer, template: str,
                         system: str = "") -> Example:
    if template == "chat":
        messages = [{"role": "system", "content": system}] if system else []
        content = user_content(instruction, input_text)
        messages.append({"role": "user", "content": content})
        return Example(render_prompt(tokenizer, messages, "chat"), response, user_texts=(content,))
    user_texts = (instruction, input_text) if input_text else (instruction,)
    return Example(alpaca_prompt(instruction, "\n".join(p for p in (system, input_text) if p)), response,
                   user_texts=user_texts)


def _from_alpaca(record: dict, tokenizer, template: str) -> Example:
    return _instruction_example(_field(record, "instruction"), _field(record, "input", False),
                                _field(record, "output"), tokenizer, template, _field(record, "system", False))


def _from_dolly(record: dict, tokenizer, template: str) -> Example:
    return _instruction_example(_field(record, "instruction"), _field(record, "context", False),
                                _field(record, "response"), tokenizer, template, _field(record, "system", False))


def _from_messages(record: dict, tokenizer, template: str) -> Example:
    return _conversation_example(list(record["messages"]), tokenizer, template)


def _from_sharegpt(record: dict, tokenizer, template: str) -> Example:
    messages = []
    for turn in record["conversations"]:
        if "from" in turn:
            role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise ValueError(f"unknown speaker {turn['from']!r}; use human, gpt or system")
            messages.append({"role": role, "content": turn["value"]})
        else:
            messages.append(turn)
    return _conversation_example(messages, tokenizer, template)


def _conversation_example(messages: list[dict], tokenizer, template: str) -> Example:
    """A conversation teaches its last assistant turn; the turns before it are the prompt."""
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"each message needs role system/user/assistant and string content, got {m!r}")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or not any(m["role"] == "user" for m in messages[:last]):
        raise ValueError("a conversation needs a user turn followed by an assistant turn to learn from")
    user_texts = tuple(m["content"] for m in messages[:last] if m["role"] == "user")
    return Example(render_prompt(tokenizer, messages[:last], template), messages[last]["content"],
                   user_texts=user_texts)


def _from_text(record: dict, tokenizer, template: str) -> Example:
    return Example("", _field(record, "text"))


# -------------------------------------------------------------- tokenizing
def tokenize_examples(examples: Iterable[Example], tokenizer, *, cutoff_len: int, train_on_inputs: bool,
                      chunk_text: bool) -> tuple[list[Tokenized], dict]:
    """Token ids and labels for each example, and counts of what was cut or dropped.

    Prompt and response are tokenized separately and concatenated, so the ids at the
    junction are exactly those generation sees after the rendered prompt.
    """
    eos = tokenizer.eos_token_id
    rows: list[Tokenized] = []
    stats = {"truncated": 0, "dropped": 0}
    for example in examples:
        prompt_ids, droppable = _prompt_tokens(example, tokenizer)
        response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
        if example.end_with_eos and eos is not None:
            response_ids = response_ids + [eos]
        if not example.prompt and chunk_text and len(response_ids) > cutoff_len:
            rows += [Tokenized(c, list(c)) for c in _windows(response_ids, cutoff_len)]
            continue
        ids = prompt_ids + response_ids
        labels = ids if train_on_inputs else [-100] * len(prompt_ids) + response_ids
        if len(ids) > cutoff_len:
            stats["truncated"] += 1
            ids, labels = ids[:cutoff_len], labels[:cutoff_len]
        if all(label == -100 for label in labels):
            stats["dropped"] += 1  # the prompt alone fills CUTOFF_LEN: nothing left to learn
            continue
        rows.append(Tokenized(list(ids), list(labels), tuple(p for p in droppable if p < len(ids))))
    return rows, stats


def _prompt_tokens(example: Example, tokenizer) -> tuple[list[int], tuple[int, ...]]:
    """The prompt's ids, and the positions of the tokens that lie wholly inside the user's words.

    The prompt is tokenized whole (the ids generation will see); the tokenizer's character offsets
    say which tokens came from the user's text, so template and special tokens are never among them.
    A tokenizer without offsets (a slow one) gives no positions: nothing is dropped then.
    """
    if not example.prompt:
        return [], ()
    spans, start = [], 0
    for text in example.user_texts:
        at = example.prompt.find(text, start) if text else -1
        if at >= 0:
            spans.append((at, at + len(text)))
            start = at + len(text)
    if not spans or not getattr(tokenizer, "is_fast", False):
        return tokenizer(example.prompt, add_special_tokens=False)["input_ids"], ()
    encoded = tokenizer(example.prompt, add_special_tokens=False, return_offsets_mapping=True)
    droppable = tuple(i for i, (lo, hi) in enumerate(encoded["offset_mapping"])
                      if hi > lo and any(a <= lo and hi <= b for a, b in spans))
    return encoded["input_ids"], droppable


def _windows(ids: list[int], size: int) -> list[list[int]]:
    step = max(1, size - int(size * TEXT_OVERLAP))
    starts = range(0, max(1, len(ids) - size + step), step)
    return [ids[s:s + size] for s in starts if ids[s:s + size]]


def load_examples(path: Path, tokenizer, *, data_format: str | None, prompt_template: str | None,
                  cutoff_len: int, train_on_inputs: bool) -> tuple[list[Tokenized], dict]:
    """Read ``path`` and return its tokenized examples with a summary (format, template, counts)."""
    records = read_records(path)
    fmt = check_format(data_format, records)
    try:
        template = resolve_template(tokenizer, prompt_template)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc
    examples = to_examples(records, fmt, tokenizer, template)
    rows, stats = tokenize_examples(examples, tokenizer, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs,
                                    chunk_text=fmt == "text")
    if not rows:
        raise InvalidInput(f"No example of {path.name} has a response left within CUTOFF_LEN={cutoff_len} tokens; "
                           "raise CUTOFF_LEN or shorten the prompts.")
    summary = {"data_format": fmt, "prompt_template": template if fmt != "text" else "none",
               "records": len(records) if isinstance(records, list) else 1, "examples": len(rows), **stats}
    return rows, summary


class PaddingCollator:
    """Pads each batch to its own longest row (right side), labels with -100."""

    def __init__(self, pad_id: int, multiple_of: int = 8) -> None:
        self.pad_id = pad_id
        self.multiple_of = multiple_of

    def __call__(self, rows: list) -> dict:
        import torch

        rows = [r if isinstance(r, Tokenized) else Tokenized(r["input_ids"], r["labels"]) for r in rows]
        longest = max(len(r) for r in rows)
        if self.multiple_of > 1:
            longest = -(-longest // self.multiple_of) * self.multiple_of
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row)
            ids[i, :n] = torch.tensor(row.input_ids)
            labels[i, :n] = torch.tensor(row.labels)
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
