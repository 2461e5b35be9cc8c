"""The OpenAPI schema tells the truth: one regression test per class of failure Schemathesis found
(tests/test_fuzz.py runs it), each asserting the fixed behaviour directly.

* undocumented statuses (ST103): every error a route answers is documented, with the error body;
* schema-valid requests refused (ST202): required bodies say so, 2.0 is an integer, paths are not blank;
* schema-violating requests accepted (ST201): no pydantic coercion, no loosely read flags, no null body;
* Allow header mismatches (ST205): a 405 lists the path's methods as the schema does;
* server errors (ST101): a model name that cannot be loaded is the caller's 404, extreme sampling values
  and seeds, internal argument names and odd paths are answered, not crashed on;
* event streams (ST108): the events a stream sends are the ones documented.
"""

from __future__ import annotations

import json
import re

import pytest
import requests

pytestmark = pytest.mark.e2e

GREEDY = {"max_new_tokens": 4, "do_sample": False}


@pytest.fixture(scope="module")
def openapi(tiny_server) -> dict:
    return requests.get(tiny_server.url + "/openapi.json", timeout=30).json()


def operations(openapi: dict):
    for path, methods in openapi["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def documented(openapi: dict, method: str, path: str) -> set[int]:
    return {int(s) for s in openapi["paths"][path][method.lower()]["responses"]}


def call(server, method: str, path: str, body=None, **kwargs) -> requests.Response:
    return requests.request(method, server.url + path, json=body, timeout=120, **kwargs)


def assert_answer(openapi: dict, server, method: str, path: str, status: int, body=None, route: str | None = None,
                  **kwargs) -> dict:
    """The call answers ``status``, which its operation (``route``: the schema's path) documents."""
    response = call(server, method, path, body, **kwargs)
    assert response.status_code == status, response.text
    assert status in documented(openapi, method, route or path), (method, route or path, status)
    return response.json()


# ------------------------------------------------------------------ ST103: every status documented
def test_every_error_answer_is_documented_with_the_error_body(openapi):
    schemas = openapi["components"]["schemas"]
    assert "HTTPValidationError" not in schemas  # FastAPI's {"detail": [...]}, which this server never sends
    assert set(schemas["ErrorBody"]["required"]) == {"error"}
    assert set(schemas["ErrorDetail"]["required"]) == {"type", "message", "status"}
    for path, method, operation in operations(openapi):
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith(("/ErrorBody", "/NotReadyBody")), (method, path, status)
        if "requestBody" in operation:  # a body that is not JSON, and one over the cap
            assert {"400", "413"} <= set(operation["responses"]), (method, path)


def test_action_routes_document_their_errors(openapi, tiny_server):
    for path, method, operation in operations(openapi):
        if "jaseci actions" in operation.get("tags", []) and method == "post":
            assert {"400", "413", "503"} <= set(operation["responses"]), path
    # What the fuzzer got undocumented before: 404, 403 and 400 from the action routes.
    assert_answer(openapi, tiny_server, "POST", "/job_status/", 404, {"job_id": "nope"})
    assert_answer(openapi, tiny_server, "POST", "/cancel_job/", 404, {"job_id": "nope"})
    assert_answer(openapi, tiny_server, "POST", "/unload_adapter/", 404, {"name": "nope"})
    assert_answer(openapi, tiny_server, "POST", "/load_adapter/", 403, {"path": "/etc"})
    assert_answer(openapi, tiny_server, "POST", "/evaluate/", 404, {"data_file": "missing.json"})
    assert_answer(openapi, tiny_server, "POST", "/list_jobs/", 400, [None, None])


def test_api_routes_document_their_errors(openapi, tiny_server):
    assert_answer(openapi, tiny_server, "DELETE", "/v1/adapters/nope", 404, route="/v1/adapters/{name}")
    assert_answer(openapi, tiny_server, "GET", "/v1/jobs/nope", 404, route="/v1/jobs/{job_id}")
    assert_answer(openapi, tiny_server, "POST", "/v1/jobs/nope/resume", 404, route="/v1/jobs/{job_id}/resume")
    assert_answer(openapi, tiny_server, "PUT", "/v1/adapters/default", 404, {"name": "nope"})
    assert_answer(openapi, tiny_server, "POST", "/v1/adapters", 403, {"path": "/etc"})
    # A body that is not UTF-8 JSON: 400, documented (FastAPI answers it before the schema is checked).
    response = requests.put(tiny_server.url + "/v1/adapters/default", data=b"\xff8",
                            headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400 and 400 in documented(openapi, "PUT", "/v1/adapters/default")
    # The OpenAI routes answer a body that does not fit with 400, as OpenAI does: 422 is not theirs.
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/load_lora_adapter"):
        assert "422" not in openapi["paths"][path]["post"]["responses"] and "400" in \
            openapi["paths"][path]["post"]["responses"]
    assert_answer(openapi, tiny_server, "POST", "/v1/completions", 400, {"model": "base"})
    assert_answer(openapi, tiny_server, "POST", "/v1/completions", 404, {"model": "ghost", "prompt": "Hi"})


def test_with_a_token_every_protected_route_documents_401(tmp_path):
    from llm_module.server.app import create_app
    from llm_module.server.security import PUBLIC_PATHS
    from llm_module.settings import Settings

    doc = create_app(Settings(home=tmp_path, token="a-token-of-tests")).openapi()
    scheme = doc["components"]["securitySchemes"]["bearerAuth"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    assert doc["security"] == [{"bearerAuth": []}]
    for path, method, operation in operations(doc):
        if path in PUBLIC_PATHS:
            assert operation["security"] == [], path
        else:
            assert "401" in operation["responses"], (method, path)
    # Without a token nothing asks for one (a fuzzer would report the routes as ignoring their auth).
    plain = create_app(Settings(home=tmp_path)).openapi()
    assert "security" not in plain and "securitySchemes" not in plain["components"]


# ------------------------------------------------------------------ ST202: what the schema allows is served
def test_required_bodies_and_parameters_are_marked_required(openapi, tiny_server):
    train = openapi["paths"]["/train/"]["post"]["requestBody"]
    assert train["required"] is True
    assert set(train["content"]["application/json"]["schema"]["required"]) == {"data_file", "output_dir"}
    assert openapi["paths"]["/list_jobs/"]["post"]["requestBody"]["required"] is False  # no body: {}
    listed = call(tiny_server, "POST", "/list_jobs/")
    assert listed.status_code == 200 and isinstance(listed.json(), list)
    assert_answer(openapi, tiny_server, "POST", "/train/", 400)  # the body the schema requires is missing


def test_paths_in_bodies_are_not_blank(openapi, tiny_server):
    for name in ("EvaluateBody", "TrainBody", "LoadAdapterBody"):
        props = openapi["components"]["schemas"][name]["properties"]
        for field in ("data_file", "output_dir", "path"):
            if field in props:
                pattern = props[field]["pattern"]
                assert not re.match(pattern, "") and not re.match(pattern, "  ") and re.match(pattern, "a.json")
    assert_answer(openapi, tiny_server, "POST", "/v1/evaluate", 422, {"data_file": ""})
    assert_answer(openapi, tiny_server, "POST", "/v1/adapters", 422, {"path": " "})
    param = openapi["paths"]["/v1/jobs/{job_id}"]["get"]["parameters"][0]
    assert param["schema"]["minLength"] == 1


def test_a_whole_number_written_as_a_float_is_an_integer(openapi, tiny_server):
    """JSON Schema counts 2.0 as an integer, so the server does too (pydantic 1 strict ints refused it)."""
    body = assert_answer(openapi, tiny_server, "POST", "/v1/generate", 200,
                         {"prompt": "Hello", "max_new_tokens": 2.0, "do_sample": False})
    assert body["results"][0]["generated_text"]
    assert assert_answer(openapi, tiny_server, "POST", "/v1/completions", 200,
                         {"model": "base", "prompt": "Hi", "max_tokens": 2.0, "n": 1.0, "temperature": 0})


def test_generate_states_prompt_or_messages(openapi, tiny_server):
    rule = openapi["components"]["schemas"]["GenerateBody"]["anyOf"]
    assert [branch["required"] for branch in rule] == [["prompt"], ["messages"]]
    action = openapi["paths"]["/generate/"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert [branch["required"] for branch in action["anyOf"]] == [["prompt"], ["messages"], ["**kwargs"]]
    messages = {"**kwargs": {"messages": [{"role": "user", "content": "Hi"}], **GREEDY}}
    assert_answer(openapi, tiny_server, "POST", "/generate/", 200, messages)
    assert_answer(openapi, tiny_server, "POST", "/generate/", 200, {"prompt": "", **messages})


def test_settings_caps_are_schema_maxima(openapi, tiny_server):
    settings = requests.get(tiny_server.url + "/v1/settings", timeout=30).json()
    props = openapi["components"]["schemas"]["GenerateBody"]["properties"]
    assert props["max_new_tokens"]["anyOf"][0]["maximum"] == settings["max_new_tokens"]
    assert props["prompt"]["anyOf"][0]["maxLength"] == settings["max_prompt_chars"]
    assert props["prompt"]["anyOf"][1]["maxItems"] == settings["max_prompts"]
    sequences = min(settings["max_return_sequences"], settings["max_batch"])
    assert props["num_return_sequences"]["anyOf"][0]["maximum"] == sequences
    stream = openapi["components"]["schemas"]["StreamBody"]["properties"]
    assert stream["num_beams"]["anyOf"][0]["maximum"] == 1 and stream["prompt"]["anyOf"][0]["type"] == "string"


def test_reload_is_documented_only_where_there_is_an_adapters_dir(openapi, tiny_server):
    assert "/v1/adapters/reload" not in openapi["paths"]  # tiny_server has none: the route says how to set one
    assert call(tiny_server, "POST", "/v1/adapters/reload").status_code == 400


# ------------------------------------------------------------------ ST201: what the schema refuses is refused
@pytest.mark.parametrize("body", [
    {"prompt": "Hi", "max_new_tokens": "2"},  # pydantic 1 turned "2" into 2
    {"prompt": "Hi", "chat": "yes"},
    {"prompt": "Hi", "temperature": True},
    {"prompt": "Hi", "json_schema": []},  # a list of pairs became a dict
    {"prompt": 5},  # and 5 became "5"
    {"prompt": []},
    {"prompt": "Hi", "seed": 2**60},
])
def test_v1_bodies_are_strictly_typed(openapi, tiny_server, body):
    assert_answer(openapi, tiny_server, "POST", "/v1/generate", 422, body)


@pytest.mark.parametrize("body", [
    {"prompt": "Hi", "chat": "yes", **GREEDY},  # the engine read these with bool()
    {"prompt": "Hi", "return_full_text": 1, **GREEDY},
    {"prompt": "Hi", "system_prompt": 5, **GREEDY},
    {"prompt": "Hi", "seed": 2**70, "do_sample": True},  # torch overflowed: 500
    {"prompt": "Hi", "model": 1},  # an argument name of the engine's own: 500
    {"prompt": "Hi", "constraint_factory": 1},
])
def test_action_arguments_are_checked_as_the_schema_says(openapi, tiny_server, body):
    assert_answer(openapi, tiny_server, "POST", "/generate/", 400, body)


def test_a_null_body_is_not_an_object(openapi, tiny_server):
    response = requests.post(tiny_server.url + "/model_info/", data="null",
                             headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400 and "got null" in response.json()["error"]["message"]
    assert_answer(openapi, tiny_server, "POST", "/load_adapter/", 400, {"path": "adapters/tiny", "make_default": "x"})


def test_openai_bodies_are_strictly_typed(openapi, tiny_server):
    for body in ({"model": "base", "prompt": "Hi", "n": "1"}, {"model": "base", "prompt": "Hi", "suffix": "x"},
                 {"model": "base", "prompt": "Hi", "logit_bias": {"1": 2}}, {"model": "", "prompt": "Hi"}):
        assert_answer(openapi, tiny_server, "POST", "/v1/completions", 400, body)
    chat = {"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
    assert_answer(openapi, tiny_server, "POST", "/v1/chat/completions", 400, chat)


# ------------------------------------------------------------------ ST205: Allow headers
@pytest.mark.parametrize("method,path,allowed", [
    ("OPTIONS", "/v1/adapters", "GET, POST"),
    ("OPTIONS", "/v1/adapters/default", "PUT"),
    ("DELETE", "/v1/adapters/default", "PUT"),  # a fixed path wins over /v1/adapters/{name}, as in OpenAPI
    ("OPTIONS", "/v1/adapters/tiny", "DELETE"),
    ("GET", "/generate/", "POST"),
    ("PATCH", "/v1/jobs/x/cancel", "POST"),
])
def test_a_405_lists_the_methods_of_its_path(openapi, tiny_server, method, path, allowed):
    response = requests.request(method, tiny_server.url + path, timeout=30)
    assert response.status_code == 405, response.text
    assert response.headers["Allow"] == allowed
    route = path if path in openapi["paths"] else next(
        p for p in openapi["paths"] if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", p), path))
    assert {m.upper() for m in openapi["paths"][route]} == set(allowed.split(", "))


# ------------------------------------------------------------------ ST101: answered, not crashed on
def test_a_hub_model_that_cannot_be_loaded_is_not_found(monkeypatch, tmp_path):
    from llm_module.errors import NotFound
    from llm_module.loader import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NotFound) as info:
        load_model("some-org/no-such-model", models_dir=tmp_path)
    assert info.value.status == 404 and "Hugging Face hub" in str(info.value)


def test_setup_loads_only_models_inside_the_data_root(openapi, tiny_server):
    for body, status in [({"model_name": "some-org/no-such-model"}, 404), ({"model_name": "default"}, 403),
                         ({"device": "cpu"}, 403), ({"model_name": ""}, 403), ({"model_name": "nowhere"}, 404),
                         ({"model_name": "model", "device": 5}, 400)]:
        error = assert_answer(openapi, tiny_server, "POST", "/setup/", status, body)["error"]
        if status == 403:
            assert "inside its data root" in error["message"], error
    assert call(tiny_server, "POST", "/model_info/").json()["model"] == "model"  # nothing above changed it


@pytest.mark.parametrize("options", [
    {"temperature": 5e-324},  # 0 in float32: 0 / 0
    {"temperature": 1e308},  # inf in float32: inf / inf
    {"repetition_penalty": 5e-324},  # a seen token's logit / 5e-324: inf
    {"temperature": 5e-324, "top_p": 5e-324, "typical_p": 5e-324, "repetition_penalty": 5e-324},
    {"repetition_penalty": 1e17, "top_k": 10**9, "min_new_tokens": 3},
])
def test_extreme_sampling_values_sample(openapi, tiny_server, options):
    body = {"prompt": "Hello", "max_new_tokens": 3, "do_sample": True, "seed": 1, **options}
    text = assert_answer(openapi, tiny_server, "POST", "/v1/generate", 200, body)["results"][0]["generated_text"]
    assert text.startswith("Hello")


def test_beam_search_takes_extreme_values_or_refuses_them_clearly(openapi, tiny_server):
    body = {"prompt": "Hello", "max_new_tokens": 3, "num_beams": 2, "do_sample": True, "seed": 1}
    for options in ({"temperature": 5e-324, "repetition_penalty": 5e-324}, {"temperature": 1e308}):
        assert_answer(openapi, tiny_server, "POST", "/generate/", 200, {**body, **options})
    # transformers' beam search knows no OpenAI penalties (it raised: 500), and overflows on a huge length_penalty.
    error = assert_answer(openapi, tiny_server, "POST", "/generate/", 400, {**body, "presence_penalty": 0.5})
    assert "beam search" in error["error"]["message"]
    assert_answer(openapi, tiny_server, "POST", "/generate/", 400, {**body, "length_penalty": 1e308})
    bounds = openapi["components"]["schemas"]["GenerateBody"]["properties"]["length_penalty"]["anyOf"][0]
    assert (bounds["minimum"], bounds["maximum"]) == (-50, 50)


def test_a_tiny_temperature_samples_the_greedy_answer(tiny_server):
    def text(options):
        body = {"prompt": "Hello", "max_new_tokens": 4, "seed": 3, **options}
        return call(tiny_server, "POST", "/v1/generate", body).json()["results"][0]["generated_text"]

    assert text({"do_sample": True, "temperature": 1e-30}) == text({"do_sample": False})


def test_odd_paths_are_not_found(openapi, tiny_server):
    for path in ("~no-such-user-x/data.json", "x" * 300 + ".json", "é" * 200):
        error = assert_answer(openapi, tiny_server, "POST", "/evaluate/", 404, {"data_file": path})["error"]
        assert "does not exist" in error["message"]


# ------------------------------------------------------------------ ST108: event streams as documented
def test_stream_events_are_the_documented_ones(openapi, tiny_server):
    media = openapi["paths"]["/v1/generate/stream"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    allowed = set(media["schema"]["properties"]["event"]["enum"])
    assert allowed == {"message", "done", "error"}
    response = call(tiny_server, "POST", "/v1/generate/stream", {"prompt": "Hi", **GREEDY})
    assert response.status_code == 200
    events = [block for block in response.text.split("\n\n") if block.strip()]
    for block in events:
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        assert fields.get("event", "message") in allowed and json.loads(fields["data"])
    assert events[-1].startswith("event: done")


def test_the_http_train_body_takes_every_llm_train_option():
    """POST /v1/jobs/train and the train action reach every option llm.train has (params.TRAIN_OPTIONS)."""
    from llm_module.server.schemas import TrainBody
    from llm_module.training.params import TRAIN_OPTIONS

    assert set(TRAIN_OPTIONS) - set(TrainBody.__fields__) == set()
