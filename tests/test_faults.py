"""Fault tests with real processes: kill -9 the server mid-request, kill -9 a training run, then go on."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
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

        in_flight = threading.Event()

        def long_request() -> None:
            body = {"prompt": "Story", "do_sample": False, "max_new_tokens": 1000, "min_new_tokens": 1000}
            try:
                with requests.post(f"{server.url}/v1/generate/stream", json=body, stream=True, timeout=60) as resp:
                    for line in resp.iter_lines():
                        if line.startswith(b"data: "):
                            in_flight.set()  # the server is generating it now
            except requests.RequestException:
                pass  # the connection dies with the server: that is the point

        caller = threading.Thread(target=long_request)
        caller.start()
        assert in_flight.wait(60), "the long request never started"
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
from llm_module.engine.state import StateFile
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
    from llm_module.engine.state import StateFile

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
    from llm_module.training.checkpoints import checkpoints as run_checkpoints
    from llm_module.training.checkpoints import is_complete

    checkpoints = [int(p.name.split("-")[1]) for p in run_checkpoints(out) if is_complete(p)]
    assert checkpoints and not (out / "final").exists(), "killed mid-run: checkpoints but no final adapter"

    engine = Engine(state_file=StateFile(tmp_path / "home2" / "state.json"))
    try:
        engine.setup(str(tiny_model_dir))
        params = {"MICRO_BATCH_SIZE": 2, "BATCH_SIZE": 2, "EPOCHS": 6, "LEARNING_RATE": 5e-3,
                  "LORA_R": 4, "LORA_ALPHA": 8}
        result = engine.train(str(data), str(out), params, resume_from_checkpoint=True, show_progress=False,
                              training_args_kwargs={"save_strategy": "steps", "save_steps": 2})
        resumed_step = int(Path(result["resumed_from"]).name.split("-")[1])
        assert resumed_step == max(checkpoints) >= 2  # the last complete checkpoint, not an earlier one
        assert result["started_at_step"] == resumed_step  # this run trained steps after it only, none again
        assert result["steps"] == 24 and not result["cancelled"]
        steps = [s["step"] for s in json.loads((out / "training_log.json").read_text())["steps"]]
        assert steps == list(range(1, 25))  # one log across the kill: continued, nothing trained twice
        assert engine.generate("Code of item 3?", adapter="run", do_sample=False, max_new_tokens=4)
    finally:
        engine.close()


EXITS_MID_JOB = """
import sys, time
from pathlib import Path
from llm_module.engine import Engine
from llm_module.settings import Settings
model, data, out, home = sys.argv[1:5]
engine = Engine(Settings(home=Path(home)))
engine.setup(model)
params = {"MICRO_BATCH_SIZE": 2, "BATCH_SIZE": 2, "EPOCHS": 50, "LEARNING_RATE": 5e-3, "LORA_R": 4, "LORA_ALPHA": 8}
job = engine.train(data, out, params, background=True)
while (engine.job_status(job["job_id"])["progress"].get("step") or 0) < 2:
    time.sleep(0.05)
print(job["job_id"], flush=True)
# the script ends here, with the job's thread inside a training step
"""


def test_a_process_that_exits_mid_job_exits_cleanly_and_leaves_it_resumable(tiny_model_dir, tmp_path):
    import json
    import subprocess
    import sys

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Code of item {i}?", "input": "",
                                        "output": f"Item {i} has code Z{i}."}) + "\n" for i in range(8)))
    home = tmp_path / "home"
    for attempt in range(2):  # the abort it guards against came at a random point of a step
        out = tmp_path / f"run{attempt}"
        proc = subprocess.run([sys.executable, "-c", EXITS_MID_JOB, str(tiny_model_dir), str(data), str(out),
                               str(home)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "terminate called" not in proc.stderr, proc.stderr[-2000:]
        job_id = proc.stdout.split()[-1]
        record = json.loads((home / "jobs" / f"{job_id}.json").read_text())
        assert record["state"] == "interrupted", record  # resumable, as after a crash, not "cancelled"
        assert record["progress"]["last_checkpoint"], record  # stopped at a step, with a checkpoint
        assert not (out / "final").exists()


JOB = {"data_file": "train.jsonl", "output_dir": "runs/job",
       "training_params": {"MICRO_BATCH_SIZE": 2, "BATCH_SIZE": 2, "EPOCHS": 12, "LEARNING_RATE": 5e-3,
                           "LORA_R": 4, "LORA_ALPHA": 8},
       "training_args_kwargs": {"save_strategy": "steps", "save_steps": 2}}


def _job(url: str, job_id: str) -> dict:
    return requests.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()


def _wait_for(url: str, job_id: str, done, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while not done(job := _job(url, job_id)):
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
    return job


@pytest.mark.parametrize("auto", [False, True])
def test_a_job_outlives_a_killed_server_and_resumes_from_its_last_checkpoint(tiny_data_root, tmp_path, auto):
    """kill -9 mid-training: the restarted server knows the job as interrupted, with its last complete
    checkpoint, and resumes it (on request, or at start-up with resume_interrupted_jobs)."""
    import json
    import shutil

    from llm_module.training.checkpoints import checkpoints, is_complete

    root = tmp_path / "root"
    shutil.copytree(tiny_data_root, root)
    (root / "train.jsonl").write_text("".join(json.dumps({"instruction": f"Code of item {i}?", "input": "",
                                                          "output": f"Item {i} has code Z{i}."}) + "\n"
                                              for i in range(8)))
    workdir, args = tmp_path / "server", ("--model", str(root / "model"), "--data-root", str(root))
    server = start_server(workdir, *args)
    try:
        started = requests.post(f"{server.url}/v1/jobs/train", json=JOB, timeout=60)
        assert started.status_code == 202, started.text
        job_id = started.json()["job_id"]
        _wait_for(server.url, job_id, lambda j: (j["progress"].get("step") or 0) >= 7)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
    finally:
        server.stop()
    out = root / "runs" / "job"
    last = max((c for c in checkpoints(out) if is_complete(c)), key=lambda c: int(c.name.split("-")[1]))
    assert not (out / "final").exists()

    restarted = start_server(workdir, *args, *(["--resume-interrupted-jobs"] if auto else []))
    try:
        if not auto:
            job = _job(restarted.url, job_id)
            assert job["state"] == "interrupted" and job["progress"]["last_checkpoint"] == str(last), job
            resumed = requests.post(f"{restarted.url}/v1/jobs/{job_id}/resume", timeout=60)
            assert resumed.status_code == 202, resumed.text
        job = _wait_for(restarted.url, job_id, lambda j: j["state"] not in ("interrupted", "queued", "running"))
        assert job["state"] == "done" and job["runs"] == 2, job
        assert job["result"]["resumed_from"] == str(last)
        total = job["result"]["total_steps"]
        steps = [s["step"] for s in json.loads((out / "training_log.json").read_text())["steps"]]
        assert steps == list(range(1, total + 1))  # continued from the checkpoint: no step trained twice
        names = [a["name"] for a in requests.get(f"{restarted.url}/v1/adapters", timeout=30).json()]
        assert "job" in names  # the finished adapter is live
    finally:
        restarted.stop()


def test_a_run_killed_mid_way_leaves_the_previous_final_adapter_as_it_was(tiny_model_dir, tmp_path):
    """A second run into the same folder dies mid-way (kill -9): the first run's final/ is untouched."""
    import hashlib
    import json
    import subprocess
    import sys

    from llm_module.engine import Engine
    from llm_module.engine.state import StateFile

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Code of item {i}?", "input": "",
                                        "output": f"Item {i} has code Z{i}."}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    engine = Engine(state_file=StateFile(tmp_path / "home" / "state.json"))
    try:
        engine.setup(str(tiny_model_dir))
        engine.train(str(data), str(out), {"MICRO_BATCH_SIZE": 2, "BATCH_SIZE": 2, "EPOCHS": 1, "LORA_R": 4},
                     show_progress=False)
    finally:
        engine.close()
    final = out / "final"

    def digest() -> dict:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(final.iterdir())}

    before = digest()
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, str(tiny_model_dir), str(data), str(out),
                             str(tmp_path / "home2")], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # the second run is well under way, checkpoints on disk
            if (json.loads(line).get("step") or 0) >= 5:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    assert any(out.glob("checkpoint-*")), "the second run had started writing"
    assert digest() == before
