"""Hostile inputs against the running service: tokens, paths out of the data root, size caps."""

from __future__ import annotations

import os

import pytest
import requests

from llm_module.actions import ACTIONS
from tests.conftest import start_server

pytestmark = pytest.mark.e2e

TOKEN = "s3cret-token-for-tests"
CAPS = ["--max-body-bytes", "8192", "--max-prompt-chars", "500", "--max-new-tokens", "16",
        "--max-return-sequences", "2", "--max-prompts", "3"]


@pytest.fixture(scope="module")
def locked_server(tiny_data_root, tmp_path_factory):
    """Token required, small caps, confined to the tiny data root."""
    server = start_server(tmp_path_factory.mktemp("locked"), "--model", str(tiny_data_root / "model"),
                          "--data-root", str(tiny_data_root), *CAPS, env={"LLM_MODULE_TOKEN": TOKEN})
    yield server
    server.stop()


def post(server, path, body=None, token: str | None = TOKEN, **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(server.url + path, json=body, headers=headers, timeout=60, **kwargs)


def assert_error(response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    for fragment in fragments:
        assert fragment in error["message"], error["message"]


# ------------------------------------------------------------------ token
@pytest.mark.parametrize("name", sorted(ACTIONS))
def test_every_action_is_refused_without_the_token(locked_server, name):
    assert_error(post(locked_server, f"/{name}", {}, token=None), 401, "needs a token")
    assert_error(post(locked_server, f"/{name}/", {}, token="wrong-token-123"), 401, "token is wrong")
    assert_error(requests.post(f"{locked_server.url}/t/wrong-token-123/{name}", json={}), 401, "token is wrong")


def test_api_routes_are_refused_without_the_token(locked_server):
    for method, path in [("post", "/v1/generate"), ("post", "/v1/generate/stream"), ("get", "/v1/adapters"),
                         ("get", "/v1/jobs"), ("post", "/v1/jobs/train"), ("get", "/v1/settings"),
                         ("delete", "/v1/adapters/x"), ("get", "/v1/model")]:
        assert_error(requests.request(method, locked_server.url + path, json={}), 401, "needs a token")
    # A token-shaped path without a token segment, or with the token in a query string, is not enough.
    assert_error(requests.post(f"{locked_server.url}/t//generate", json={"prompt": "Hi"}), 401)
    assert_error(requests.post(f"{locked_server.url}/generate?token={TOKEN}", json={"prompt": "Hi"}), 401)


def test_a_wrong_token_of_the_right_length_is_refused(locked_server):
    """hmac.compare_digest: refused like any wrong token, in time that does not depend on where it differs."""
    from llm_module.server.security import tokens_match

    for wrong in (TOKEN[:-1] + "X", "X" + TOKEN[1:], "x" * len(TOKEN)):
        assert len(wrong) == len(TOKEN) and not tokens_match(wrong, TOKEN)
        assert_error(post(locked_server, "/model_info", {}, token=wrong), 401, "token is wrong")
        assert_error(requests.get(f"{locked_server.url}/t/{wrong}/v1/model", timeout=30), 401, "token is wrong")
    assert tokens_match(TOKEN, TOKEN) and not tokens_match(None, TOKEN)


def test_the_token_opens_every_door(locked_server):
    body = {"prompt": "Hi", "**kwargs": {"max_new_tokens": 3, "do_sample": False}}
    by_header = post(locked_server, "/generate", body)
    by_path = requests.post(f"{locked_server.url}/t/{TOKEN}/generate", json=body)
    assert by_header.status_code == by_path.status_code == 200
    assert by_header.json() == by_path.json()
    assert requests.get(f"{locked_server.url}/t/{TOKEN}/jaseci_actions_spec/").json()["llm.generate"]
    assert post(locked_server, "/v1/settings", token=TOKEN).status_code == 405  # it is a GET
    settings = requests.get(locked_server.url + "/v1/settings", headers={"Authorization": f"Bearer {TOKEN}"})
    assert settings.json()["token"] == "***"


def test_probes_stay_open(locked_server):
    assert requests.get(locked_server.url + "/healthz").status_code == 200
    assert requests.get(locked_server.url + "/readyz").status_code == 200


# ------------------------------------------------------------------ paths
def hostile_paths(root) -> list[str]:
    outside = root.parent / f"{root.name}-outside"
    outside.mkdir(exist_ok=True)
    (outside / "data.jsonl").write_text('{"text": "secret"}\n')
    link = root / "escape"
    if not link.exists():
        os.symlink(outside, link)
    return ["../" + outside.name + "/data.jsonl", str(outside / "data.jsonl"), "escape/data.jsonl",
            "/etc/passwd", "adapters/../../" + outside.name, "~/.ssh/id_rsa"]


def test_paths_outside_the_data_root_are_refused(locked_server, tiny_data_root):
    for path in hostile_paths(tiny_data_root):
        calls = {
            "/evaluate": {"data_file": path},
            "/load_adapter": {"path": path},
            "/train": {"data_file": path, "output_dir": "runs/x"},
            "/setup": {"lora_dir": path},
        }
        for route, body in calls.items():
            assert_error(post(locked_server, route, body), 403, "outside the data root")
        assert_error(post(locked_server, "/train", {"data_file": "model/config.json", "output_dir": path}), 403)
        assert_error(post(locked_server, "/v1/adapters", {"path": path}), 403, "outside the data root")
        assert_error(post(locked_server, "/setup", {"**kwargs": {"adapters": {"x": path}}}), 403)
    assert_error(post(locked_server, "/setup", {"model_name": "/etc"}), 403, "outside the data root")
    assert_error(post(locked_server, "/setup", {"tokenizer_name": "../x/y"}), 403, "outside the data root")
    assert_error(post(locked_server, "/evaluate", {"data_file": "a\x00b"}), 400, "NUL")
    assert_error(post(locked_server, "/train", {"data_file": "model/config.json", "output_dir": "runs/x",
                                                "training_params": {"logging_dir": "/tmp/elsewhere"}}), 403)


def test_model_options_that_escape_are_refused(locked_server):
    assert_error(post(locked_server, "/setup", {"**kwargs": {"model_kwargs": {"trust_remote_code": True}}}),
                 403, "trust_remote_code")
    assert_error(post(locked_server, "/setup", {"**kwargs": {"tokenizer_kwargs": {"cache_dir": "/tmp/x"}}}),
                 403, "cache_dir")
    assert post(locked_server, "/model_info").json()["model"] == "model"  # nothing above changed the model


# ------------------------------------------------------------------ size caps
def test_size_caps(locked_server):
    gen = "/generate"
    assert_error(post(locked_server, gen, {"prompt": "x" * 9000}), 413, "8192 bytes")
    assert_error(post(locked_server, gen, {"prompt": "x" * 501}), 413, "cap of 500")
    assert_error(post(locked_server, gen, {"prompt": ["a", "b", "c", "d"]}), 413, "cap of 3")
    assert_error(post(locked_server, gen, {"prompt": "Hi", "**kwargs": {"max_new_tokens": 17}}), 400, "cap of 16")
    assert_error(post(locked_server, gen, {"prompt": "Hi", "**kwargs": {"max_length": 5000}}), 400, "max_length")
    assert_error(post(locked_server, gen, {"prompt": "Hi", "**kwargs": {"num_return_sequences": 3}}), 400,
                 "cap of 2")
    assert_error(post(locked_server, gen, {"prompt": "Hi", "**kwargs": {"num_beams": 64}}), 400, "num_beams")
    messages = [{"role": "user", "content": "y" * 300}, {"role": "user", "content": "y" * 300}]
    assert_error(post(locked_server, gen, {"**kwargs": {"messages": messages}}), 413, "cap of 500")
    # Within the caps it works, and an omitted max_new_tokens falls back to the cap (16), not 256.
    ok = post(locked_server, gen, {"prompt": "Hi", "**kwargs": {"do_sample": False, "min_new_tokens": 16}})
    assert ok.status_code == 200, ok.text
    counted = post(locked_server, "/v1/completions", {"model": "base", "prompt": "Hi", "temperature": 0})
    assert counted.status_code == 200, counted.text
    assert counted.json()["usage"]["completion_tokens"] == 16 and counted.json()["choices"][0]["finish_reason"] == \
        "length"
    assert ok.json()[0]["generated_text"] == "Hi" + counted.json()["choices"][0]["text"]  # the same 16 tokens


def test_body_cap_holds_without_content_length(locked_server):
    def chunks():
        for _ in range(20):
            yield b"x" * 1024

    response = requests.post(locked_server.url + "/generate", data=chunks(),
                             headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert_error(response, 413, "over this server's cap of 8192")
