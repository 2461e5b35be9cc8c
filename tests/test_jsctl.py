"""Real jsctl sessions: load the action module three ways and run the jac_examples walkers."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_module.settings import Settings
from tests.jsctl_utils import JacSession


def _session(tmp_path: Path) -> JacSession:
    # A private LLM_MODULE_HOME (state), the shared model cache (no re-conversion).
    return JacSession(tmp_path / "jsctl", env={
        "LLM_MODULE_HOME": str(tmp_path / "home"),
        "LLM_MODULE_CACHE": str(Settings().models_dir),
    })


def _report(result: dict) -> list:
    assert result.get("success"), result.get("errors") or result
    return result["report"]


@pytest.mark.slow
@pytest.mark.e2e
def test_local_load_then_chat_walker_answers_paris(tmp_path):
    session = _session(tmp_path)
    info = session.load_local()
    assert info["success"]
    result, _ = session.jac_run("chat.jac", ctx={"question": "What is the capital of France?"})
    assert "Paris" in _report(result)[0]


@pytest.mark.slow
@pytest.mark.e2e
def test_module_load_then_every_task_example_reports_text(tmp_path):
    session = _session(tmp_path)
    session.load_module()
    texts = {}
    for example in ("generate.jac", "qa_context.jac", "summarize.jac", "translate.jac"):
        result, _ = session.jac_run(example)
        report = _report(result)
        assert isinstance(report[0], str) and report[0].strip(), example
        texts[example] = report[0]
    assert "1889" in texts["qa_context.jac"]
    assert texts["generate.jac"].startswith("The three primary colors are")


@pytest.mark.slow
@pytest.mark.e2e
def test_actions_call_with_ctx_in_one_jsctl_process(tmp_path):
    session = _session(tmp_path)
    values, out = session.script(
        "actions load module llm_module.llm",
        'actions call llm.generate -ctx \'{"prompt": "What is the capital of France?", "chat": true, '
        '"do_sample": false, "max_new_tokens": 20}\'',
    )
    call = values[-1]
    assert call["success"], out[-2000:]
    assert "Paris" in call["result"][0]["generated_text"]


@pytest.fixture()
def tiny_session(tmp_path, tiny_model_dir, tiny_adapter_dir):
    session = _session(tmp_path)
    session.load_module(ctx={"model_name": str(tiny_model_dir), "adapters": {"style": str(tiny_adapter_dir)}})
    return session


@pytest.mark.e2e
def test_custom_setup_is_what_a_new_jsctl_process_loads(tiny_session, tiny_model_dir):
    result, out = tiny_session.jac_run("model_info.jac")
    info, adapters = _report(result)
    assert info["model"] == tiny_model_dir.name, out[-2000:]
    assert [a["name"] for a in adapters] == ["style"]


@pytest.mark.e2e
def test_action_error_reaches_the_walker_with_its_message(tiny_session):
    result, _ = tiny_session.jac_run("generate.jac", ctx={"max_new_tokens": -5})
    errors = " ".join(result.get("errors", []))
    assert "max_new_tokens must be >= 1" in errors
    ok, _ = tiny_session.jac_run("generate.jac", ctx={"max_new_tokens": 4})
    assert _report(ok)[0]


@pytest.mark.e2e
def test_adapters_example_loads_compares_and_unloads(tmp_path, tiny_model_dir, tiny_adapter_dir):
    session = _session(tmp_path)
    session.load_local(ctx={"model_name": str(tiny_model_dir)})
    result, _ = session.jac_run("adapters.jac", ctx={"adapter_path": str(tiny_adapter_dir), "name": "demo"})
    compared, listed, unloaded = _report(result)
    assert compared["base"] != compared["adapter"]
    assert [a["name"] for a in listed] == ["demo"]
    assert unloaded["adapters"] == []

