"""``llm-module`` / ``python -m llm_module``: settings precedence and the thin engine commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from llm_module.cli import build_parser, settings_from_args


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm_module", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_flags_beat_env_beat_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_MODULE_MAX_NEW_TOKENS", "77")
    monkeypatch.setenv("LLM_MODULE_ADAPTERS", json.dumps({"env": str(tmp_path)}))
    monkeypatch.setenv("LLM_MODULE_TOKEN", "")  # empty means no token
    settings = settings_from_args(build_parser().parse_args(["serve"]))
    assert settings.max_new_tokens == 77 and settings.adapters == {"env": str(tmp_path)}
    assert settings.token is None and settings.prefix_cache is True and settings.port == 8000
    args = build_parser().parse_args(["serve", "--max-new-tokens", "5", "--adapter", "a=x", "--adapter", "b=y",
                                      "--no-prefix-cache", "--prefill-chunk", "64", "--data-root", str(tmp_path)])
    settings = settings_from_args(args)
    assert settings.max_new_tokens == 5 and settings.adapters == {"a": "x", "b": "y"}
    assert settings.prefix_cache is False and settings.prefill_chunk == 64 and settings.data_root == tmp_path


def test_every_setting_is_a_serve_flag():
    """The flags are made from Settings: none is missing, none is extra."""
    from llm_module.settings import Settings

    serve = next(a for a in build_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("serve"))
    dests = {action.dest for action in serve._actions} - {"help", "run"}
    assert dests == set(Settings.__fields__)


def test_bad_settings_exit_2_with_the_reason(tmp_path):
    proc = run_cli("serve", "--data-root", str(tmp_path / "missing"))
    assert proc.returncode == 2
    assert "data_root" in proc.stderr and "not a directory" in proc.stderr
    proc = run_cli("serve", "--port", "1", env={"LLM_MODULE_TOKEN": "short"})
    assert proc.returncode == 2 and "token" in proc.stderr


def test_generate_prints_json_and_adapters_reads_saved_state(tiny_model_dir, tiny_adapter_dir, tmp_path):
    env = {"LLM_MODULE_HOME": str(tmp_path / "home")}
    proc = run_cli("generate", "Hello", "--model", str(tiny_model_dir), "--adapter-dir", f"tiny={tiny_adapter_dir}",
                   "--adapter", "tiny", "--max-new-tokens", "4", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [result] = json.loads(proc.stdout)
    assert result["generated_text"].startswith("Hello")
    proc = run_cli("adapters", env=env)  # the generate call's setup saved the adapter for the next process
    assert json.loads(proc.stdout) == [{"name": "tiny", "path": str(tiny_adapter_dir), "default": False}]


def test_engine_errors_exit_nonzero_with_json(tiny_model_dir, tmp_path):
    proc = run_cli("generate", "Hello", "--model", str(tiny_model_dir), "--adapter", "nope",
                   env={"LLM_MODULE_HOME": str(tmp_path / "home")})
    assert proc.returncode == 2
    assert json.loads(proc.stderr[proc.stderr.index("{"):])["error"]["type"] == "not_found"
