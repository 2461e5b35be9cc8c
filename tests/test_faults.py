"""Fault tests with real processes: kill -9 the server mid-request, kill -9 a training run, then go on."""

from __future__ import annotations

import os
import signal
import threading
import time

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
