"""Structured output: ``json_schema`` constrains a row's answer to JSON of that schema, in the same
batch as free rows, through the Python API and a Jac walker alike."""

from __future__ import annotations

import json
import threading

import pytest

from llm_module.engine import Engine
from llm_module.engine.state import StateFile
from llm_module.errors import InvalidInput
from llm_module.settings import Settings

SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "sure": {"type": "boolean"},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["colour", "sure", "count"], "additionalProperties": False}
GREEDY = {"do_sample": False, "max_new_tokens": 40}


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_adapter_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("structured")
    eng = Engine(Settings(home=home), state_file=StateFile(home / "state.json"))
    eng.setup(str(tiny_model_dir), adapters={"tiny": str(tiny_adapter_dir)})
    yield eng
    eng.close()


def _valid(text: str) -> dict:
    value = json.loads(text)
    assert set(value) == {"colour", "sure", "count"}, value
    assert value["colour"] in ("red", "green", "blue") and isinstance(value["sure"], bool)
    assert isinstance(value["count"], int) and 0 <= value["count"] <= 9
    return value


@pytest.mark.parametrize("adapter", ["base", "tiny"])
def test_the_answer_parses_and_fits_the_schema_for_the_base_and_an_adapter(engine, adapter):
    for prompt in ("Pick one.", "Another prompt entirely", "x"):
        out = engine.generate(prompt, chat=True, adapter=adapter, json_schema=SCHEMA, **GREEDY)
        _valid(out[0]["generated_text"])
    sampled = engine.generate("Pick.", chat=True, json_schema=SCHEMA, do_sample=True, temperature=1.5, seed=3,
                              max_new_tokens=40, num_return_sequences=3)
    for row in sampled:
        _valid(row["generated_text"])


def test_constrained_and_free_rows_share_the_batch(engine):
    free_alone = engine.generate("Hello there", **GREEDY)
    constrained_alone = engine.generate("Pick one.", chat=True, json_schema=SCHEMA, **GREEDY)
    results: dict = {}
    calls = {"free": lambda: engine.generate("Hello there", **GREEDY),
             "constrained": lambda: engine.generate("Pick one.", chat=True, json_schema=SCHEMA, **GREEDY)}
    threads = [threading.Thread(target=lambda k=k, c=c: results.__setitem__(k, c())) for k, c in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == {"free": free_alone, "constrained": constrained_alone}
    _valid(constrained_alone[0]["generated_text"])


def test_a_json_object_without_a_schema(engine):
    out = engine.generate("Anything", chat=True, json_schema={"type": "object"}, **GREEDY)
    assert isinstance(json.loads(out[0]["generated_text"]), dict)


@pytest.mark.parametrize(("schema", "phrase"), [({"type": "nonsense"}, "not a usable JSON schema"),
                                                 ("not a schema", "must be a JSON schema object"),
                                                 ([1, 2], "must be a JSON schema object")])
def test_what_is_not_a_schema_is_refused(engine, schema, phrase):
    with pytest.raises(InvalidInput, match=phrase):
        engine.generate("Hi", json_schema=schema, **GREEDY)
