"""Real jsctl against the real service: `actions load remote URL`, then walkers run unchanged."""

from __future__ import annotations

import pytest

from tests.conftest import start_server
from tests.jsctl_utils import JacSession

pytestmark = pytest.mark.e2e

WALKERS = "remote_generate.jac"
TOKEN = "jsctl-token-0123456789"


def reports(result: dict) -> list:
    assert result.get("success"), result.get("errors") or result
    return result["report"]


def test_walkers_run_against_the_remote_service(tiny_server, tiny_data_root, tmp_path):
    session = JacSession(tmp_path / "jsctl")
    session.load_remote(tiny_server.url)
    result, out = session.jac_run(WALKERS, ctx={"prompt": "Hello", "max_new_tokens": 6})
    [text] = reports(result)
    assert isinstance(text, str) and text.startswith("Hello") and len(text) > len("Hello"), out[-2000:]

    # An action error reaches the walker as a JSON body carrying the message, not a JSONDecodeError.
    result, out = session.jac_run(WALKERS, walker="bad_option")
    [failure] = reports(result)
    assert "max_new_tokenz" in failure["failed"] and "Did you mean 'max_new_tokens'" in failure["failed"]

    result, _ = session.jac_run(WALKERS, walker="with_adapter", ctx={"adapter": "tiny"})
    with_adapter = reports(result)[0][0]["generated_text"]
    result, _ = session.jac_run(WALKERS, walker="with_adapter", ctx={"adapter": "base"})
    assert reports(result)[0][0]["generated_text"] != with_adapter


def test_load_remote_with_ctx_runs_setup_on_the_server(tiny_data_root, tmp_path):
    server = start_server(tmp_path / "server", "--no-preload", "--data-root", str(tiny_data_root),
                          wait_ready=False)
    try:
        session = JacSession(tmp_path / "jsctl")
        session.load_remote(server.url, ctx={"model_name": "model", "adapters": {"tiny": "adapters/tiny"}})
        # model_info loads nothing: with --no-preload only the -ctx setup can have loaded these.
        result, _ = session.jac_run(WALKERS, walker="describe_model")
        [info] = reports(result)
        assert info["model"] == "model" and info["adapters"] == ["tiny"], info
    finally:
        server.stop()


def test_token_refuses_every_walker_call_without_it_and_allows_with_it(tiny_data_root, tmp_path):
    server = start_server(tmp_path / "server", "--model", str(tiny_data_root / "model"),
                          "--data-root", str(tiny_data_root), env={"LLM_MODULE_TOKEN": TOKEN})
    try:
        outsider = JacSession(tmp_path / "outsider")
        outsider.load_remote(server.url)
        result, _ = outsider.jac_run(WALKERS)
        [failure] = reports(result)
        assert "needs a token" in failure["failed"]
        result, _ = outsider.jac_run(WALKERS, walker="describe_model")
        assert reports(result)[0]["error"]["status"] == 401

        insider = JacSession(tmp_path / "insider")
        insider.load_remote(f"{server.url}/t/{TOKEN}")
        result, _ = insider.jac_run(WALKERS, ctx={"prompt": "Hello", "max_new_tokens": 4})
        [text] = reports(result)
        assert text.startswith("Hello")
    finally:
        server.stop()
