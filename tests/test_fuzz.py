"""Property-based fuzzing of the whole HTTP API: Schemathesis (``st run --checks all``) against a real server
on 127.0.0.1, from the app's own OpenAPI schema, over every route (the jaseci actions, /v1, the OpenAI API).

The schema must hold both ways: no 5xx, every status and body documented, every schema-valid request
served and every schema-violating one refused, the right Allow headers. The few rules a schema cannot state
are listed, with why, in schemathesis.toml. Afterwards the server is up and the model and the adapter
answer exactly as before.

The fuzz server is built so that the fuzzer cannot change what it serves, only exercise it:

* its model folder and its adapter have random names; setup on a server with a data root loads only a
  model folder inside it (server/guards.py), so no fuzzed setup can swap the model (one with no arguments
  reloads the same setup);
* the adapter comes from the shared adapters folder (--adapters-dir), the source of truth of a scaled-out
  deployment: the fuzzer learns its name from GET /v1/adapters and may unload it (Schemathesis reuses the
  values it sees in responses), but the folder brings it back on its next use, with the same weights;
* a token is required (Schemathesis also checks that a request without it is refused).

Schemathesis runs from the client venv (``make clients``) with a fixed seed, so CI sends the same requests
every run.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import start_server

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
ST = REPO / ".venv-clients" / "bin" / "st"
CONFIG = REPO / "schemathesis.toml"
MAX_EXAMPLES = 15  # per operation, for the fuzzing phase; the coverage phase adds its own cases
SEED = 21
MIN_REQUESTS = 1000
ST_TIMEOUT_S = 240
# Small caps: every generation the fuzzer asks for is short, and a prompt within max_prompt_chars always fits
# the tiny model's context, so the schema's caps are the only limits a valid prompt meets.
CAPS = ["--max-new-tokens", "4", "--max-prompt-chars", "400", "--max-prompts", "4", "--max-return-sequences", "2",
        "--max-body-bytes", "65536"]


def schemathesis() -> Path:
    assert ST.exists(), f"Schemathesis is missing ({ST}): run `make clients` (make test builds the client venv)"
    return ST


@pytest.fixture(scope="module")
def fuzz_server(tiny_data_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-root")
    model, adapter = f"m-{secrets.token_hex(6)}", f"a-{secrets.token_hex(6)}"
    shutil.copytree(tiny_data_root / "model", root / "models" / model)
    shutil.copytree(tiny_data_root / "adapters" / "tiny", root / "shared" / adapter)
    token = secrets.token_urlsafe(16)
    server = start_server(tmp_path_factory.mktemp("fuzz-server"), "--model", f"models/{model}", "--data-root",
                          str(root), "--adapters-dir", "shared", *CAPS, env={"LLM_MODULE_TOKEN": token})
    server.root, server.model, server.adapter = root, model, adapter
    yield server
    server.stop()


def answers(server) -> dict:
    """What the model and the adapter answer (greedy), through /v1 and the OpenAI API, and what is loaded."""
    auth = {"Authorization": f"Bearer {server.token}"}

    def completion(model: str) -> str:  # first: it loads the adapter from the shared folder if it is not loaded
        body = {"model": model, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
        response = requests.post(server.url + "/v1/completions", json=body, headers=auth, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    def generate(adapter: str) -> str:
        body = {"prompt": "Hello, my name is", "max_new_tokens": 4, "do_sample": False, "adapter": adapter}
        response = requests.post(server.url + "/v1/generate", json=body, headers=auth, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["results"][0]["generated_text"]

    texts = {"completion:base": completion("base"), "completion:adapter": completion(server.adapter),
             "generate:base": generate("base"), "generate:adapter": generate(server.adapter)}
    described = requests.get(server.url + "/v1/model", headers=auth, timeout=30).json()
    return {**texts, "model": {k: described[k] for k in ("model", "source", "parameters", "dtype", "device")},
            "quantize": described["serving"]["quantize"]}


def test_schemathesis_finds_nothing_and_the_server_serves_as_before(fuzz_server, tmp_path):
    st = schemathesis()
    before = answers(fuzz_server)
    assert before["generate:base"] != before["generate:adapter"]  # the adapter changes the answer
    assert before["completion:base"] != before["completion:adapter"]

    started = time.monotonic()
    command = [str(st), "--config-file", str(CONFIG), "run", fuzz_server.url + "/openapi.json", "--checks", "all",
               "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1",
               "-H", f"Authorization: Bearer {fuzz_server.token}",
               "--report", "json", "--report-dir", str(tmp_path), "--output-truncate", "false"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=ST_TIMEOUT_S, cwd=tmp_path)
    seconds = time.monotonic() - started
    [report_file] = tmp_path.glob("*.json")
    report = json.loads(report_file.read_text())
    output = proc.stdout[-12000:] + proc.stderr[-3000:]

    assert report["failures"] == [] and report["errors"] == [], output
    assert proc.returncode == 0 and report["complete"], output
    operations = report["operations"]
    assert operations["tested"] == operations["selected"] == operations["total"] >= 40, operations
    assert operations["errored"] == operations["skipped"] == 0, operations
    cases = report["test_cases"]["generated"]
    assert cases >= MIN_REQUESTS, report["test_cases"]
    print(f"\nschemathesis --checks all: {cases} requests over {operations['tested']} operations, "
          f"0 failures, {seconds:.0f} s")

    # The server is up and answered everything without crashing ...
    assert fuzz_server.proc.poll() is None, fuzz_server.log()[-3000:]
    assert requests.get(fuzz_server.url + "/healthz", timeout=10).json() == {"status": "ok"}
    log = fuzz_server.log()
    assert "Traceback" not in log and "crashed" not in log, log[-5000:]
    # ... and the model and the adapter answer exactly as before (the model folder and the adapter's weights
    # are what they were: setup and the adapter routes could not swap them).
    assert answers(fuzz_server) == before
