"""The playground's page and endpoints over real uvicorn (no browser, no model): /, /ui/, /v1/files, job loss."""

from __future__ import annotations

import json
import re
import time

import pytest
import requests

from llm_module.server import routes_ui
from llm_module.server.routes_ui import STATIC_DIR, LossHistory, list_data_root
from tests.conftest import start_server

TOKEN = "ui-api-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
UPLOAD_CAP = 4096


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Data files, a model folder, an adapter, a training run and a hidden folder, to see what is listed."""
    root = tmp_path_factory.mktemp("ui-files")
    (root / "data").mkdir()
    (root / "data" / "alpaca.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (root / "notes.txt").write_text("plain text\n")
    (root / "data" / "image.png").write_bytes(b"\x89PNG")
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}")
    (root / "model" / "tokenizer.json").write_text("{}")
    (root / "adapters" / "mine").mkdir(parents=True)
    (root / "adapters" / "mine" / "adapter_config.json").write_text("{}")
    (root / "runs" / "run1" / "final").mkdir(parents=True)
    (root / "runs" / "run1" / "final" / "adapter_config.json").write_text("{}")
    (root / "runs" / "run1" / "training_log.json").write_text("{}")
    (root / ".cache").mkdir()
    (root / ".cache" / "secret.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def server(data_root, tmp_path_factory):
    """Token required, a small body cap; no model is loaded (these routes need none)."""
    server = start_server(tmp_path_factory.mktemp("ui-api"), "--no-preload", "--data-root", str(data_root),
                          "--max-body-bytes", str(UPLOAD_CAP), env={"LLM_MODULE_TOKEN": TOKEN}, wait_ready=False)
    yield server
    server.stop()


def put(server, name: str, body: bytes, headers=AUTH, **params) -> requests.Response:
    return requests.put(f"{server.url}/v1/files/{name}", data=body, headers=headers, params=params, timeout=30)


def error_of(response: requests.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


# ------------------------------------------------------------------ the page
def test_root_redirects_to_the_page_keeping_a_token_prefix(server):
    for prefix in ("", f"/t/{TOKEN}"):
        response = requests.get(f"{server.url}{prefix}/", allow_redirects=False, timeout=10)
        assert response.status_code == 307 and response.headers["location"] == "ui/"
        assert requests.get(f"{server.url}{prefix}/ui", timeout=10).url == f"{server.url}{prefix}/ui/"


def test_the_page_is_public_and_the_api_is_not(server):
    page = requests.get(server.url + "/ui/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset, kind in (("app.js", "javascript"), ("style.css", "text/css"), ("favicon.svg", "image/svg+xml")):
        response = requests.get(f"{server.url}/ui/{asset}", timeout=10)
        assert response.status_code == 200 and kind in response.headers["content-type"], asset
    assert requests.get(server.url + "/v1/files", timeout=10).status_code == 401
    assert requests.get(server.url + "/v1/jobs/x/loss", timeout=10).status_code == 401
    assert put(server, "a.jsonl", b"{}", headers={}).status_code == 401
    assert requests.get(server.url + "/ui/other.js", timeout=10).status_code == 401  # only the known files are open
    assert "no file" in error_of(requests.get(server.url + "/ui/other.js", headers=AUTH, timeout=10), 404)


def test_every_asset_is_served_by_the_package():
    """No CDN: nothing in the page refers to another host (the SVG namespace name is not a download)."""
    for path in STATIC_DIR.iterdir():
        text = path.read_text(encoding="utf-8")
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'<>)]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)
        assert not re.search(r"@import|<script[^>]*>\s*[^<\s]", text), path.name  # no imports, no inline script


# ------------------------------------------------------------------ files
def test_files_lists_data_and_adapter_folders_only(server):
    listing = requests.get(server.url + "/v1/files", headers=AUTH, timeout=10).json()
    files = {f["path"] for f in listing["data_files"]}
    assert {"data/alpaca.jsonl", "notes.txt"} <= files
    assert not files & {"model/config.json", "model/tokenizer.json", "adapters/mine/adapter_config.json",
                        "runs/run1/training_log.json", ".cache/secret.json", "data/image.png"}
    assert {a["path"] for a in listing["adapter_dirs"]} == {"adapters/mine", "runs/run1"}
    assert listing["max_upload_bytes"] == UPLOAD_CAP and listing["truncated"] is False


def test_files_listing_is_bounded(tmp_path, monkeypatch):
    for i in range(5):
        (tmp_path / f"d{i}").mkdir()
        (tmp_path / f"d{i}" / "a.jsonl").write_text("{}")
    monkeypatch.setattr(routes_ui, "MAX_LISTED", 3)
    listing = list_data_root(tmp_path)
    assert len(listing["data_files"]) == 3 and listing["truncated"] is True
    monkeypatch.setattr(routes_ui, "MAX_LISTED", 100)
    monkeypatch.setattr(routes_ui, "MAX_FOLDERS", 2)  # the root and one folder
    listing = list_data_root(tmp_path)
    assert len(listing["data_files"]) == 1 and listing["truncated"] is True


def test_upload_is_stored_under_the_data_root_and_capped(server, data_root):
    records = b'{"instruction": "Say hi.", "input": "", "output": "Hi!"}\n'
    created = put(server, "fresh.jsonl", records)
    assert created.status_code == 201, created.text
    assert created.json() == {"path": "uploads/fresh.jsonl", "size_bytes": len(records), "overwritten": False}
    assert (data_root / "uploads" / "fresh.jsonl").read_bytes() == records
    assert "exists already" in error_of(put(server, "fresh.jsonl", records), 409)
    assert put(server, "fresh.jsonl", records * 2, overwrite="true").json()["overwritten"] is True
    listed = requests.get(server.url + "/v1/files", headers=AUTH, timeout=10).json()["data_files"]
    assert listed[0]["path"] == "uploads/fresh.jsonl"  # newest first

    assert "over this server's cap" in error_of(put(server, "big.jsonl", b"x" * (UPLOAD_CAP + 1)), 413)
    assert "not a training data file" in error_of(put(server, "run.sh", b"echo"), 400)
    assert "not valid" in error_of(put(server, ".hidden.jsonl", b"{}"), 400)
    assert put(server, "..%2F..%2Fescape.jsonl", b"{}").status_code in (400, 404)
    assert not (data_root.parent / "escape.jsonl").exists()
    assert "not UTF-8" in error_of(put(server, "binary.txt", b"\xff\xfe\x00bad"), 400)
    assert "empty" in error_of(put(server, "empty.jsonl", b"  \n"), 400)
    assert sorted(p.name for p in (data_root / "uploads").iterdir()) == ["fresh.jsonl"]


def test_an_upload_over_the_cap_is_refused_while_it_streams_and_leaves_nothing(server, data_root):
    def chunks():  # no Content-Length: the cap holds while the body streams in
        for _ in range(8):
            yield b"y" * 1024

    response = requests.put(f"{server.url}/v1/files/streamed.jsonl", data=chunks(), headers=AUTH, timeout=30)
    assert "over this server's cap" in error_of(response, 413)
    uploads = data_root / "uploads"
    assert not (uploads / "streamed.jsonl").exists()
    assert not [p.name for p in uploads.iterdir() if p.name.startswith(".")] if uploads.exists() else True


def test_a_failed_upload_leaves_no_partial_file(tmp_path, monkeypatch):
    """The file is written under a temporary name and renamed: a write that fails midway leaves nothing."""
    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(routes_ui.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        routes_ui.save_upload(tmp_path, tmp_path, "data.jsonl", b'{"a": 1}\n', 1024, overwrite=False)
    assert list((tmp_path / "uploads").iterdir()) == []


def test_job_loss_of_an_unknown_job_is_404(server):
    assert "No job" in error_of(requests.get(server.url + "/v1/jobs/nope/loss", headers=AUTH, timeout=10), 404)


# ------------------------------------------------------------------ loss history (no server)
def job(state="running", step=None, loss=None, **extra) -> dict:
    progress = {"step": step, "loss": loss} if step is not None else {}
    return {"job_id": "j1", "kind": "train", "state": state, "progress": progress, "params": {}, "started": 0,
            **extra}


def test_loss_history_keeps_new_steps_and_stays_bounded():
    history = LossHistory(max_points=10)
    history.observe(job())
    for step in range(1, 26):
        history.observe(job(step=step, loss=5.0 - step / 10))
        history.observe(job(step=step, loss=5.0 - step / 10))  # a second poll of the same step adds nothing
    points = history.observe(job(step=25, loss=2.5))["points"]
    assert len(points) <= 10
    assert points[0]["step"] == 1 and points[-1] == {"step": 25, "loss": 2.5}
    assert [p["step"] for p in points] == sorted(p["step"] for p in points)


def test_loss_history_prefers_the_trainers_own_history_and_then_the_training_log(tmp_path):
    history = LossHistory()
    reported = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}]
    running = {**job(step=2, loss=2.0), "progress": {"step": 2, "loss": 2.0, "history": reported}}
    assert history.observe(running)["points"] == reported
    log = {"steps": [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 3, "loss": 2.0}],
           "eval": [{"step": 3, "eval_loss": 2.2}], "result": {"steps": 3}}
    (tmp_path / "training_log.json").write_text(json.dumps(log))
    done = history.observe(job(state="done", step=3, loss=2.0, params={"output_dir": str(tmp_path)}))
    assert done["source"] == "training_log" and [p["step"] for p in done["points"]] == [1, 2, 3]
    assert done["eval_points"] == [{"step": 3, "loss": 2.2}]
    stale = job(state="failed", params={"output_dir": str(tmp_path)}, started=time.time() + 60)
    assert history.observe(stale)["source"] == "sampled"  # an earlier run's log is not this job's


def test_the_train_forms_defaults_are_llm_trains_defaults():
    """The page's prefilled training settings are the ones llm.train uses when given none (params.py)."""
    from llm_module.training.params import DEFAULTS

    page = (STATIC_DIR / "index.html").read_text()
    shown = dict(re.findall(r'<input type="number" id="train-[a-z-]+" name="([A-Z_]+)"[^>]* value="([^"]+)"', page))
    assert set(shown) == {"EPOCHS", "LEARNING_RATE", "CUTOFF_LEN", "MICRO_BATCH_SIZE", "BATCH_SIZE", "LORA_R",
                          "LORA_ALPHA"}
    assert {key: float(value) for key, value in shown.items()} == {key: float(DEFAULTS[key]) for key in shown}
