"""Fault tests with real processes: kill -9 the server mid-request, kill -9 a training run, then go on."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import requests

from tests.conftest import start_server

GREEDY = {"do_sample": False, "max_new_tokens": 8}


def _generate(url: str, adapter: str) -> str:
    res = requests.post(f"{url}/generate", json={"prompt": "Hello", "adapter": adapter, **GREEDY}, timeout=60)
    assert res.status_code == 200, res.text
    return res.json()[0]["generated_text"]


def test_server_killed_mid_request_restarts_with_the_same_adapters(tiny_data_root, tmp_path):
    workdir = tmp_path / "server"
    args = ("--model", str(tiny_data_root / "model"), "--data-root", str(tiny_data_root))
    server = start_server(workdir, *args)
    try:
        loaded = requests.post(f"{server.url}/load_adapter", json={"path": "adapters/tiny", "name": "live"},
                               timeout=60)
        assert loaded.status_code == 200, loaded.text
        expected = _generate(server.url, "live")
        assert expected != _generate(server.url, "base")

        def long_request() -> None:
            try:
                requests.post(f"{server.url}/generate",
                              json={"prompt": "Story", "do_sample": False, "max_new_tokens": 1000}, timeout=60)
            except requests.RequestException:
                pass  # the connection dies with the server: that is the point

        caller = threading.Thread(target=long_request)
        caller.start()
        time.sleep(1.0)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        caller.join(30)
    finally:
        server.stop()

    restarted = start_server(workdir, *args)  # same LLM_MODULE_HOME: the remembered adapter set
    try:
        names = [a["name"] for a in requests.get(f"{restarted.url}/v1/adapters", timeout=10).json()]
        assert names == ["live"]
        assert _generate(restarted.url, "live") == expected
    finally:
        restarted.stop()


TRAINER = """
import json, sys, time
from llm_module.engine import Engine
from llm_module.state import StateFile
model, data, out, home = sys.argv[1:5]
engine = Engine(state_file=StateFile(__import__("pathlib").Path(home) / "state.json"))
engine.setup(model)
params = {"MICRO_BATCH_SIZE": 2, "BATCH_SIZE": 2, "EPOCHS": 6, "LEARNING_RATE": 5e-3, "LORA_R": 4, "LORA_ALPHA": 8}
job = engine.train(data, out, params, background=True,
                   training_args_kwargs={"save_strategy": "steps", "save_steps": 2})
while True:
    status = engine.job_status(job["job_id"])
    print(json.dumps({"step": status["progress"].get("step"), "state": status["state"]}), flush=True)
    time.sleep(0.2)
"""


def test_training_killed_with_sigkill_resumes_from_its_last_checkpoint(tiny_model_dir, tmp_path):
    import json
    import subprocess
    import sys

    from llm_module.engine import Engine
    from llm_module.state import StateFile

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Code of item {i}?", "input": "",
                                        "output": f"Item {i} has code Z{i}."}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, str(tiny_model_dir), str(data), str(out),
                             str(tmp_path / "home")], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # 24 steps in all; kill once a few checkpoints are on disk
            if (json.loads(line).get("step") or 0) >= 7:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    checkpoints = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert checkpoints and not (out / "final").exists(), "killed mid-run: checkpoints but no final adapter"

    engine = Engine(state_file=StateFile(tmp_path / "home2" / "state.json"))
    try:
        engine.setup(str(tiny_model_dir))
        params = {"MICRO_BATCH_SIZE": 2, "BATCH_SIZE": 2, "EPOCHS": 6, "LEARNING_RATE": 5e-3,
                  "LORA_R": 4, "LORA_ALPHA": 8}
        result = engine.train(str(data), str(out), params, resume_from_checkpoint=True, show_progress=False,
                              training_args_kwargs={"save_strategy": "steps", "save_steps": 2})
        resumed_step = int(Path(result["resumed_from"]).name.split("-")[1])
        assert resumed_step >= min(checkpoints) and resumed_step >= 2
        assert result["steps"] == 24 and not result["cancelled"]
        steps = [s["step"] for s in json.loads((out / "training_log.json").read_text())["steps"]]
        assert steps == list(range(1, 25))  # one log across the kill: continued, nothing trained twice
        assert engine.generate("Code of item 3?", adapter="run", do_sample=False, max_new_tokens=4)
    finally:
        engine.close()
