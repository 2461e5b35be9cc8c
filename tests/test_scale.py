"""Scaled-out serving: two replicas share one adapters folder; what one trains the other serves."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import start_server

REPO = Path(__file__).resolve().parent.parent
FAST = {"MICRO_BATCH_SIZE": 4, "BATCH_SIZE": 4, "EPOCHS": 3, "LEARNING_RATE": 5e-2, "CUTOFF_LEN": 128,
        "LORA_R": 4, "LORA_ALPHA": 8}
PROMPT = "What is the code of item 3?"


@pytest.fixture(scope="module")
def shared_root(tiny_model_dir, tiny_adapter_dir, tmp_path_factory) -> Path:
    """A data root like the pods' volume: the model, adapters/tiny, and training data."""
    root = tmp_path_factory.mktemp("volume")
    shutil.copytree(tiny_model_dir, root / "model")
    shutil.copytree(tiny_adapter_dir, root / "adapters" / "tiny")
    records = [{"instruction": f"What is the code of item {i}?", "input": "", "output": f"Item {i} has code Z{i}."}
               for i in range(16)]
    (root / "catalog.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return root


@pytest.fixture(scope="module")
def replicas(shared_root, tmp_path_factory):
    """Replica a reloads on request only; replica b also re-scans the folder every second."""
    common = ("--model", str(shared_root / "model"), "--data-root", str(shared_root), "--adapters-dir", "adapters")
    a = start_server(tmp_path_factory.mktemp("replica-a"), *common)
    try:
        b = start_server(tmp_path_factory.mktemp("replica-b"), *common, "--adapters-poll-s", "1")
    except Exception:
        a.stop()
        raise
    yield a, b
    a.stop()
    b.stop()


def adapters(server) -> list[str]:
    return [a["name"] for a in requests.get(server.url + "/v1/adapters", timeout=30).json()]


def greedy(server, adapter: str) -> str:
    body = {"prompt": PROMPT, "adapter": adapter, "max_new_tokens": 8, "do_sample": False}
    response = requests.post(server.url + "/v1/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["generated_text"]


def reload(server) -> dict:
    response = requests.post(server.url + "/v1/adapters/reload", timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_adapter_trained_on_one_replica_is_served_by_the_other(replicas, shared_root):
    a, b = replicas
    assert adapters(a) == adapters(b) == ["tiny"]  # every replica starts with what the folder holds

    started = requests.post(a.url + "/v1/jobs/train", timeout=30, json={
        "data_file": "catalog.jsonl", "output_dir": "adapters/fresh", "training_params": FAST}).json()
    deadline = time.monotonic() + 600
    while (job := requests.get(f"{a.url}/v1/jobs/{started['job_id']}", timeout=30).json())["state"] == "running":
        assert time.monotonic() < deadline, job["progress"]
        time.sleep(0.5)
    assert job["state"] == "done", job["error"]

    deadline = time.monotonic() + 60  # b polls the folder each second
    while "fresh" not in adapters(b):
        assert time.monotonic() < deadline, "replica b never picked up the adapter trained on replica a"
        time.sleep(0.5)
    assert greedy(b, "fresh") == greedy(a, "fresh") != greedy(b, "base")

    # A retrained adapter (a new final swapped in) is reloaded; one removed is unloaded.
    swap_in(shared_root / "adapters" / "fresh" / "final", shared_root / "adapters" / "tiny")
    report = reload(a)
    assert report["reloaded"] == ["tiny"] and report["failed"] == {}, report
    assert greedy(a, "tiny") == greedy(a, "fresh")
    shutil.rmtree(shared_root / "adapters" / "tiny")
    assert reload(a)["unloaded"] == ["tiny"]
    assert "tiny" not in adapters(a)


def swap_in(source: Path, target: Path) -> None:
    """Replace ``target`` by a copy of ``source`` in one rename, as llm.train's atomic save does."""
    staging = target.with_name(f".{target.name}.new")
    shutil.copytree(source, staging)
    old = target.with_name(f".{target.name}.old")
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old)


def test_reload_without_an_adapters_dir_says_how_to_set_one(tmp_path):
    server = start_server(tmp_path, "--no-preload", wait_ready=False)
    try:
        response = requests.post(server.url + "/v1/adapters/reload", timeout=30)
    finally:
        server.stop()
    assert response.status_code == 400
    assert "--adapters-dir" in response.json()["error"]["message"]


def test_k8s_replicas_share_one_adapters_volume():
    docs = {d["kind"]: d for d in yaml.safe_load_all((REPO / "deploy" / "k8s.yaml").read_text())}
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    deployment = docs["Deployment"]["spec"]
    assert deployment["replicas"] >= 2
    env = {e["name"]: e.get("value") for e in deployment["template"]["spec"]["containers"][0]["env"]}
    assert env["LLM_MODULE_ADAPTERS_DIR"].startswith("/data/")
    assert float(env["LLM_MODULE_ADAPTERS_POLL_S"]) > 0
    assert "LLM_MODULE_HOME" not in env  # state.json stays per pod: replicas must not overwrite each other's
    assert docs["Service"]["spec"]["sessionAffinity"] == "ClientIP"  # a client's job status reaches its pod


def test_a_reload_of_broken_files_keeps_the_adapter_answering_as_before(tiny_model_dir, tiny_adapter_dir, tmp_path):
    """A retrain wrote broken weights into the shared folder: POST /v1/adapters/reload reports the
    failure and the adapter keeps its previous weights (not the base model's answers)."""
    root = tmp_path / "volume"
    shutil.copytree(tiny_model_dir, root / "model")
    shutil.copytree(tiny_adapter_dir, root / "adapters" / "a")
    server = start_server(tmp_path / "server", "--model", str(root / "model"), "--data-root", str(root),
                          "--adapters-dir", "adapters")
    try:
        before, base = greedy(server, "a"), greedy(server, "base")
        assert before != base
        weights = root / "adapters" / "a" / "adapter_model.safetensors"
        weights.write_bytes(b"half-written garbage")  # the same folder: what a reload re-reads
        report = reload(server)
        assert "a" in report["failed"] and "not a readable safetensors file" in report["failed"]["a"], report
        assert adapters(server) == ["a"]
        assert greedy(server, "a") == before
    finally:
        server.stop()
