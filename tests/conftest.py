"""Shared fixtures: a tiny random Llama model (seconds to load) and a LoRA adapter for it.

``tiny_model_dir``: an HF model directory (2 layers, hidden 64) with the real default
tokenizer beside it, so prompts, chat templates and special tokens behave as in production.
``tiny_adapter_dir``: a LoRA adapter for it whose lora_B weights are random, so it
CHANGES greedy output (a fresh LoRA has lora_B = 0 and would change nothing).
Both are session-scoped and read-only for tests: copy them before writing into them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_SEED = 1234


def _default_tokenizer():
    from transformers import AutoTokenizer

    from llm_module.loader import convert_gguf, default_gguf_path
    from llm_module.settings import Settings

    return AutoTokenizer.from_pretrained(str(convert_gguf(default_gguf_path(), Settings().models_dir)))


def build_tiny_model(target: Path, seed: int = TINY_SEED) -> Path:
    """Save a random 2-layer Llama with the default tokenizer into ``target`` (another ``seed``: other weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _default_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in the default model
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    return target


def build_tiny_adapter(model_dir: Path, target: Path) -> Path:
    """Save a LoRA adapter for the model in ``model_dir`` with randomised lora_B weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(TINY_SEED + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(str(target))
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture()
def engine(tiny_model_dir, tmp_path):
    """A fresh Engine over the tiny model with its own state file (no adapters)."""
    from llm_module.engine import Engine
    from llm_module.engine.state import StateFile

    eng = Engine(state_file=StateFile(tmp_path / "state.json"))
    eng.setup(str(tiny_model_dir))
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return build_tiny_adapter(tiny_model_dir, tmp_path_factory.mktemp("tiny-lora") / "adapter")


# ------------------------------------------------------------------ the HTTP service in a subprocess
class RunningServer:
    """``llm-module serve`` in a subprocess on a free loopback port."""

    def __init__(self, proc, url: str, log_path: Path, token: str | None) -> None:
        self.proc, self.url, self.log_path, self.token = proc, url, log_path, token

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except Exception:
                self.proc.kill()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(workdir: Path, *args: str, env: dict | None = None, wait_ready: bool = True,
                 timeout: float = 180) -> RunningServer:
    """Start ``python -m llm_module serve ARGS`` with its own LLM_MODULE_HOME; wait for /readyz (or /healthz)."""
    import os
    import subprocess
    import sys
    import time

    import requests

    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / "server.log"
    from llm_module.settings import Settings

    # A private home (state) but the shared model cache, so the default model is never re-converted.
    full_env = {**os.environ, "LLM_MODULE_HOME": str(workdir / "home"), "LLM_MODULE_CACHE": str(Settings().models_dir),
                "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llm_module", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
            cwd=workdir, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
        )
    server = RunningServer(proc, f"http://127.0.0.1:{port}", log_path, full_env.get("LLM_MODULE_TOKEN"))
    probe = "/readyz" if wait_ready else "/healthz"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-3000:]}")
        try:
            if requests.get(server.url + probe, timeout=2).status_code == 200:
                return server
        except requests.RequestException:  # refused while starting, or slow while the model loads
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"server not up on {probe} within {timeout} s:\n{server.log()[-3000:]}")


@pytest.fixture(scope="session")
def tiny_data_root(tiny_model_dir, tiny_adapter_dir, tmp_path_factory) -> Path:
    """A data root holding copies of the tiny model (model/) and adapter (adapters/tiny/)."""
    import shutil

    root = tmp_path_factory.mktemp("data-root")
    shutil.copytree(tiny_model_dir, root / "model")
    shutil.copytree(tiny_adapter_dir, root / "adapters" / "tiny")
    return root


@pytest.fixture(scope="session")
def tiny_server(tiny_data_root, tmp_path_factory):
    """The service over the tiny model, adapter 'tiny' loaded, confined to ``tiny_data_root``, no token."""
    server = start_server(
        tmp_path_factory.mktemp("server"), "--model", str(tiny_data_root / "model"),
        "--adapter", f"tiny={tiny_data_root / 'adapters' / 'tiny'}", "--data-root", str(tiny_data_root),
    )
    yield server
    server.stop()
