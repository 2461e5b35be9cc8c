"""The HTTP service over real uvicorn on 127.0.0.1: protocol, errors, streaming, concurrency, auth."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from llm_module import llm  # noqa: F401  (registers the jaseci actions that serv_actions lists)
from llm_module.actions import ACTIONS
from llm_module.server.routes_actions import actions_spec
from tests.conftest import start_server

pytestmark = pytest.mark.e2e

GREEDY = {"max_new_tokens": 6, "do_sample": False}


def post(server, path: str, body=None, **kwargs) -> requests.Response:
    return requests.post(server.url + path, json=body, timeout=120, **kwargs)


def assert_error(response: requests.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["status"] == status
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return error


# ------------------------------------------------------------------ protocol
def test_spec_equals_what_jaseci_serv_actions_generates():
    from jaseci.jsorc import remote_actions

    remote_actions.serv_actions()  # fills remote_actions.remote_actions from the @jaseci_action registrations
    theirs = {k: v for k, v in remote_actions.remote_actions.items() if k.startswith("llm.")}
    assert actions_spec(ACTIONS) == theirs
    assert theirs["llm.generate"] == ["prompt", "**kwargs"]


def test_probes_and_spec(tiny_server):
    assert requests.get(tiny_server.url + "/healthz").json() == {"status": "ok"}
    ready = requests.get(tiny_server.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["model"] == "model"
    spec = requests.get(tiny_server.url + "/jaseci_actions_spec/").json()
    assert set(spec) == {f"llm.{name}" for name in ACTIONS}


def test_hook_style_call_with_kwargs_key_and_both_slash_forms(tiny_server):
    body = {"prompt": "Hello", "**kwargs": GREEDY}
    bare = post(tiny_server, "/generate", body)  # what jaseci's hook posts
    slashed = post(tiny_server, "/generate/", body)  # what serv_actions registers
    flat = post(tiny_server, "/generate", {"prompt": "Hello", **GREEDY})  # plain HTTP clients
    assert bare.status_code == 200, bare.text
    assert bare.json() == slashed.json() == flat.json()
    assert bare.json()[0]["generated_text"]


def test_every_action_is_reachable(tiny_server):
    assert post(tiny_server, "/model_info", {}).json()["adapters"] == ["tiny"]
    assert post(tiny_server, "/list_adapters", {}).json()[0]["name"] == "tiny"
    assert post(tiny_server, "/list_jobs", {}).json() == []
    assert post(tiny_server, "/set_default_adapter", {}).json() == {"default_adapter": None}
    assert_error(post(tiny_server, "/job_status", {"job_id": "nope"}), 404, "No job")
    assert_error(post(tiny_server, "/cancel_job", {"job_id": "nope"}), 404, "No job")
    assert_error(post(tiny_server, "/unload_adapter", {"name": "nope"}), 404, "No adapter named 'nope'")
    assert_error(post(tiny_server, "/load_adapter", {"path": "adapters/missing"}), 404, "does not exist")
    assert_error(post(tiny_server, "/evaluate", {"data_file": "missing.jsonl"}), 404, "does not exist")
    assert_error(post(tiny_server, "/train", {"data_file": "missing.jsonl", "output_dir": "runs/x"}), 404,
                 "does not exist")
    assert post(tiny_server, "/setup", {"**kwargs": {"adapters": "not-a-dict"}}).status_code == 400
    openapi = requests.get(tiny_server.url + "/openapi.json").json()
    for name in ACTIONS:
        assert f"/{name}/" in openapi["paths"], name
    generate_schema = openapi["paths"]["/generate/"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "max_new_tokens", "adapter", "**kwargs"} <= set(generate_schema["properties"])


def test_mixed_adapter_requests_together_match_one_by_one(tiny_server):
    prompts = ["Hello", "The sky is", "Once upon", "Jac is"]
    cases = [(p, adapter) for p in prompts for adapter in ("tiny", "base")]
    alone = {case: post(tiny_server, "/v1/generate", {"prompt": case[0], "adapter": case[1], **GREEDY}).json()
             for case in cases}
    assert alone[("Hello", "tiny")] != alone[("Hello", "base")]  # the adapter changes the output
    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(
            lambda c: post(tiny_server, "/v1/generate", {"prompt": c[0], "adapter": c[1], **GREEDY}).json(), cases))
    for case, result in zip(cases, together, strict=True):
        assert result["results"] == alone[case]["results"], case


# ------------------------------------------------------------------ errors
def test_errors_are_json_with_the_right_status(tiny_server):
    assert_error(post(tiny_server, "/generate", {"prompt": "Hi", "**kwargs": {"max_new_tokenz": 3}}), 400,
                 "max_new_tokenz", "Did you mean 'max_new_tokens'")
    assert_error(post(tiny_server, "/load_adapter", {"pathh": "x"}), 400, "no parameter 'pathh'", "'path'")
    assert_error(post(tiny_server, "/train", {"data_file": "x"}), 400, "needs output_dir")
    assert_error(post(tiny_server, "/generate", {"prompt": ""}), 400, "empty")
    assert_error(post(tiny_server, "/generate", {"prompt": "Hi", "**kwargs": 5}), 400, "must be an object")
    assert_error(requests.post(tiny_server.url + "/generate", data=b"{not json", timeout=10), 400, "not JSON")
    assert_error(requests.post(tiny_server.url + "/generate", json=[1, 2], timeout=10), 400, "JSON object")
    assert_error(requests.get(tiny_server.url + "/nowhere", timeout=10), 404, "No endpoint GET /nowhere")
    assert_error(requests.get(tiny_server.url + "/generate", timeout=10), 405, "GET is not allowed")
    assert_error(post(tiny_server, "/v1/generate", {"prompt": "Hi", "max_new_tokens": "many"}), 422, "max_new_tokens")
    assert_error(post(tiny_server, "/v1/jobs/nope/cancel"), 404, "No job")


def test_failed_startup_load_answers_503_with_the_reason(tmp_path):
    server = start_server(tmp_path, "--model", str(tmp_path / "no-such-model"), wait_ready=False)
    try:
        deadline = time.monotonic() + 120
        while (ready := requests.get(server.url + "/readyz")).json().get("startup") == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert_error(ready, 503, "does not exist")
        assert_error(post(server, "/generate", {"prompt": "Hi"}), 503, "start-up model load failed", "no-such-model")
        assert post(server, "/model_info", {}).json()["ready"] is False
    finally:
        server.stop()


# ------------------------------------------------------------------ streaming and concurrency
def sse_events(response: requests.Response) -> list[tuple[str, dict]]:
    events = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines.get("event", "message"), json.loads(lines["data"])))
    return events


def test_stream_sends_pieces_then_done(tiny_server):
    body = {"prompt": "Hello", "max_new_tokens": 12, "do_sample": False}
    response = post(tiny_server, "/v1/generate/stream", body, stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"message"} and len(kinds) >= 2
    assert "".join(data["text"] for kind, data in events[:-1]) == events[-1][1]["text"]
    whole = post(tiny_server, "/v1/generate", {**body, "adapter": "base"}).json()["results"][0]["generated_text"]
    assert whole == "Hello" + events[-1][1]["text"]


def test_stream_request_errors_come_back_as_json(tiny_server):
    assert_error(post(tiny_server, "/v1/generate/stream", {"prompt": "Hi", "max_new_tokens": 10**6}), 400, "cap")
    assert_error(post(tiny_server, "/v1/generate/stream", {"prompt": ["a", "b"]}), 400, "one prompt")


def test_long_generation_does_not_block_other_requests(tiny_server):
    """While a long stream is being generated, other routes and a short generation are answered."""
    body = {"prompt": "Go", "max_new_tokens": 1000, "do_sample": False, "min_new_tokens": 1000}
    with requests.post(tiny_server.url + "/v1/generate/stream", json=body, stream=True, timeout=120) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith(b"data: "))  # it is being generated now
        assert requests.get(tiny_server.url + "/healthz", timeout=5).status_code == 200
        assert requests.get(tiny_server.url + "/v1/jobs", timeout=5).status_code == 200
        short = post(tiny_server, "/v1/generate", {"prompt": "Hi", "max_new_tokens": 2, "do_sample": False})
        assert short.status_code == 200, short.text
        more = [line for line, _ in zip(lines, range(5), strict=False) if line.startswith(b"data: ")]
        assert more and b'"done"' not in b"".join(more), "the long stream ended before the others were answered"


# ------------------------------------------------------------------ adapters and jobs over /v1
def test_adapter_load_list_unload(tiny_server):
    loaded = post(tiny_server, "/v1/adapters", {"path": "adapters/tiny", "name": "tiny2"})
    assert loaded.status_code == 200, loaded.text
    assert {a["name"] for a in requests.get(tiny_server.url + "/v1/adapters").json()} == {"tiny", "tiny2"}
    assert_error(post(tiny_server, "/v1/adapters", {"path": "adapters/tiny", "name": "tiny2"}), 409, "already loaded")
    unloaded = requests.delete(tiny_server.url + "/v1/adapters/tiny2", timeout=60)
    assert unloaded.json()["adapters"] == ["tiny"]
    assert_error(requests.delete(tiny_server.url + "/v1/adapters/tiny2", timeout=60), 404)


def test_training_job_endpoints(tiny_server, tiny_data_root):
    assert requests.get(tiny_server.url + "/v1/jobs").json() == []
    assert_error(requests.get(tiny_server.url + "/v1/jobs/nope"), 404, "No job")
    assert_error(post(tiny_server, "/v1/jobs/train", {"data_file": "/etc/passwd", "output_dir": "runs/a"}), 403)
    data = tiny_data_root / "train.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Q{i}", "input": "", "output": f"A{i}"})
                              for i in range(8)) + "\n")
    started = post(tiny_server, "/v1/jobs/train", {"data_file": "train.jsonl", "output_dir": "runs/job",
                                                   "training_params": {"EPOCHS": 500}})
    assert started.status_code == 202, started.text
    job_id = started.json()["job_id"]
    deadline = time.monotonic() + 120
    while (job := requests.get(tiny_server.url + f"/v1/jobs/{job_id}").json())["progress"].get("step", 0) < 1:
        assert job["state"] in ("queued", "running"), job  # a valid run: it trains until cancelled
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert requests.get(tiny_server.url + "/healthz", timeout=2).status_code == 200  # training blocks nothing
    assert post(tiny_server, f"/v1/jobs/{job_id}/cancel").json()["state"] == "cancelling"
    deadline = time.monotonic() + 120
    while (job := requests.get(tiny_server.url + f"/v1/jobs/{job_id}").json())["state"] == "cancelling":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert job["state"] == "cancelled", job
    assert not (tiny_data_root / "runs" / "job" / "final").exists()  # a cancelled run writes no adapter
