"""The OpenAI-compatible API, called by real clients: the official ``openai`` package, LiteLLM and a
Jac 2 program through byLLM, each in the client venv (Python 3.12; ``make clients`` builds it),
against a real server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
CLIENTS = REPO / "tests" / "clients"
CLIENT_PYTHON = REPO / ".venv-clients" / "bin" / "python"
JAC = REPO / ".venv-clients" / "bin" / "jac"


def client_venv() -> Path:
    assert CLIENT_PYTHON.exists(), "the client venv is missing: run `make clients` (make test builds it)"
    return CLIENT_PYTHON


def run_client(script: str, *args: str, timeout: float = 300) -> dict:
    proc = subprocess.run([str(client_venv()), str(CLIENTS / script), *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def calls(tiny_server) -> dict:
    return run_client("openai_calls.py", tiny_server.url + "/v1", "unused-key", "model", "tiny")


def test_models_list_the_base_model_and_the_adapters(calls):
    assert calls["models"] == ["model", "tiny"]


def test_chat_completions_route_the_adapter_through_model(calls):
    base, tuned = calls["chat:model"], calls["chat:tiny"]
    assert base["text"] and tuned["text"] and base["text"] != tuned["text"]
    assert base["object"] == "chat.completion" and base["id"].startswith("chatcmpl-")
    assert base["fingerprint"].startswith("llm_module-")
    assert base["finish"] == "length" and base["usage"]["completion_tokens"] == 8
    assert base["usage"]["total_tokens"] == base["usage"]["prompt_tokens"] + 8


def test_streaming_chunks_add_up_to_the_same_answer_with_usage(calls):
    stream = calls["chat_stream"]
    assert stream["text"] == calls["chat:tiny"]["text"]
    assert stream["object"] == "chat.completion.chunk" and stream["finish"] == "length"
    assert stream["usage"] == calls["chat:tiny"]["usage"]


def test_logprobs_and_completions(calls):
    assert len(calls["chat_logprobs"]) == 4 and all(t["top"] == 3 and t["logprob"] <= 0
                                                    for t in calls["chat_logprobs"])
    completions = calls["completions"]
    assert len(completions["texts"]) == 4 and completions["texts"][0] == completions["texts"][1]  # greedy, n=2
    assert completions["texts"][0] != completions["texts"][2]  # two prompts
    assert completions["usage"]["completion_tokens"] == 20 and len(completions["tokens"]) == 5
    assert calls["completions_stream"] == completions["texts"][0]


def test_seeded_sampling_repeats_and_n_gives_several(calls):
    first, again = calls["seeded"]
    assert first == again and len(first) == 2


def test_structured_output_parses_into_the_schema_for_base_and_adapter(calls):
    for name in ("model", "tiny"):
        parsed = calls[f"parsed:{name}"]
        assert parsed["color"] in ("red", "green", "blue") and isinstance(parsed["sure"], bool)


def test_bad_requests_get_openai_errors(calls):
    errors = calls["errors"]
    assert errors["unknown_model"]["status"] == 404 and errors["unknown_model"]["param"] == "model"
    assert "does not exist" in errors["unknown_model"]["message"]
    assert errors["empty_messages"]["status"] == 400 and errors["empty_messages"]["param"] == "messages"
    assert errors["wrong_type"]["status"] == 400 and errors["wrong_type"]["param"] == "max_tokens"
    assert errors["n_too_large"]["status"] == 400 and "n=1000" in errors["n_too_large"]["message"]
    assert errors["bad_schema"]["status"] == 400 and "not a usable JSON schema" in errors["bad_schema"]["message"]


def test_litellm_calls_the_same_server(tiny_server):
    result = run_client("litellm_call.py", tiny_server.url + "/v1", "unused-key", "tiny")
    assert result["text"] and result["finish"] == "length"


def test_a_client_that_drops_a_stream_frees_its_row_and_the_server_stays_up(tiny_server):
    body = {"model": "model", "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 500,
            "min_tokens": 500, "temperature": 0, "stream": True}
    with requests.post(tiny_server.url + "/v1/chat/completions", json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines).startswith(b"data: ")
    after = requests.post(tiny_server.url + "/v1/chat/completions", timeout=60, json={
        "model": "model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0})
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"]


def test_vllm_adapter_routes_load_and_unload(tiny_server):
    loaded = requests.post(tiny_server.url + "/v1/load_lora_adapter",
                           json={"lora_name": "tiny2", "lora_path": "adapters/tiny"}, timeout=60)
    assert loaded.status_code == 200, loaded.text
    assert "tiny2" in [m["id"] for m in requests.get(tiny_server.url + "/v1/models").json()["data"]]
    unloaded = requests.post(tiny_server.url + "/v1/unload_lora_adapter", json={"lora_name": "tiny2"}, timeout=60)
    assert unloaded.status_code == 200
    assert "tiny2" not in [m["id"] for m in requests.get(tiny_server.url + "/v1/models").json()["data"]]
    missing = requests.post(tiny_server.url + "/v1/unload_lora_adapter", json={"lora_name": "tiny2"}, timeout=60)
    assert missing.status_code == 404 and missing.json()["error"]["message"]


def test_a_jac2_program_gets_typed_answers_through_byllm(tiny_server):
    env = {**os.environ, "LLM_MODULE_URL": tiny_server.url, "LLM_MODULE_MODEL": "tiny"}
    proc = subprocess.run([str(JAC), "run", str(REPO / "jac_examples" / "jac2" / "ask.jac")], capture_output=True,
                          text=True, timeout=600, env=env, cwd=REPO / "jac_examples" / "jac2")
    # The tiny random model cannot add, but its enum answer is constrained to the schema: it parses.
    assert "sentiment: Sentiment." in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "capital:" in proc.stdout


def test_adapters_load_on_first_use_and_the_least_recently_used_make_room(tiny_model_dir, tiny_adapter_dir,
                                                                          tmp_path):
    """LoRAX-style: a model naming a folder of --adapters-dir loads on first use; past
    --max-loaded-adapters the least recently used one goes (it comes back on its next use)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tests.conftest import start_server

    root = tmp_path / "root"
    shutil.copytree(tiny_model_dir, root / "model")
    for name, scale in (("a", 1.0), ("b", -3.0), ("c", 6.0)):
        shutil.copytree(tiny_adapter_dir, root / "shared" / name)
        weights = root / "shared" / name / "adapter_model.safetensors"
        save_file({k: v * scale if "lora_B" in k else v for k, v in load_file(str(weights)).items()}, str(weights))
    server = start_server(tmp_path / "server", "--model", str(root / "model"), "--data-root", str(root),
                          "--adapters-dir", "shared", "--max-loaded-adapters", "2", "--no-preload", wait_ready=False)
    body = {"messages": [{"role": "user", "content": "Tell me about the weather"}], "max_tokens": 12,
            "temperature": 0}

    def ask(model: str) -> str:
        response = requests.post(server.url + "/v1/chat/completions", json={"model": model, **body}, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    def models() -> list[str]:
        return [m["id"] for m in requests.get(server.url + "/v1/models", timeout=60).json()["data"]]

    try:
        requests.post(server.url + "/setup", json={"model_name": "model"}, timeout=120).raise_for_status()
        assert models() == ["model"]  # the folders are not loaded until asked for
        first = {name: ask(name) for name in ("a", "b")}
        assert models() == ["model", "a", "b"]
        ask("a")  # a is now more recent than b
        third = ask("c")
        assert models() == ["model", "a", "c"]  # b, the least recently used, made room
        assert ask("b") == first["b"] and models() == ["model", "b", "c"]  # and comes back as it was
        assert len({first["a"], first["b"], third}) == 3
        assert "Loading adapter c on first use" in server.log()
        assert "Unloading adapter b (least recently used" in server.log()
        # An adapter loaded on demand goes with its folder: a reload after the folder is taken out
        # unloads it (the chaos soak found it listed still), and a request for it is a 404.
        shutil.move(root / "shared" / "c", tmp_path / "c-out")
        report = requests.post(server.url + "/v1/adapters/reload", timeout=120).json()
        assert report["unloaded"] == ["c"] and models() == ["model", "b"]
        gone = requests.post(server.url + "/v1/chat/completions", json={"model": "c", **body}, timeout=60)
        assert gone.status_code == 404 and gone.json()["error"]["param"] == "model"
    finally:
        server.stop()
