"""The bad-input catalogue: every case is refused with a message naming the problem, through the
Python API, through jsctl and through HTTP; afterwards the model and every adapter still answer.

Each case is one row: (id, action, ctx, phrase the message must contain, transports).
Relative paths are files of a per-run data root: the Python engine and the server are confined
to it, and jsctl runs with it as its working directory.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from llm_module.actions import ACTIONS
from llm_module.engine import Engine
from llm_module.engine.state import StateFile
from llm_module.errors import LLMError
from llm_module.settings import Settings
from tests.conftest import start_server
from tests.jsctl_utils import JacSession

ALL = ("python", "jsctl", "http")
CONFINED = ("python", "http")  # jsctl runs unconfined, like a local user


@dataclass(frozen=True)
class Case:
    id: str
    action: str
    ctx: dict
    phrase: str
    transports: tuple = ALL


GEN = {"prompt": "hi", "max_new_tokens": 2, "do_sample": False}

CASES = [
    # ---- generate
    Case("gen-unknown-option", "generate", {**GEN, "max_new_tokns": 3}, "Did you mean 'max_new_tokens'"),
    Case("gen-negative-max-new-tokens", "generate", {**GEN, "max_new_tokens": -1}, "max_new_tokens must be >= 1"),
    Case("gen-string-max-new-tokens", "generate", {**GEN, "max_new_tokens": "ten"}, "must be an integer"),
    Case("gen-zero-temperature", "generate", {**GEN, "do_sample": True, "temperature": 0}, "temperature must be > 0"),
    Case("gen-top-p-out-of-range", "generate", {**GEN, "do_sample": True, "top_p": 3}, "top_p must be in (0, 1]"),
    Case("gen-do-sample-string", "generate", {**GEN, "do_sample": "yes"}, "do_sample must be true or false"),
    Case("gen-bad-top-k", "generate", {**GEN, "top_k": -4}, "top_k must be >= 0"),
    Case("gen-empty-prompt", "generate", {**GEN, "prompt": "   "}, "is empty or not a string"),
    Case("gen-no-prompt", "generate", {"max_new_tokens": 2}, "prompt must be a string or a non-empty list"),
    Case("gen-prompt-number", "generate", {**GEN, "prompt": 42}, "prompt must be a string or a non-empty list"),
    Case("gen-prompt-list-with-number", "generate", {**GEN, "prompt": ["a", 5]}, "prompt[1] is empty"),
    Case("gen-thousands-of-prompts", "generate", {**GEN, "prompt": ["hi"] * 3000}, "split them into several calls"),
    Case("gen-prompt-over-context", "generate", {**GEN, "prompt": "word " * 2100}, "model's context is 2048"),
    Case("gen-unknown-adapter", "generate", {**GEN, "adapter": "ghost"}, "No adapter named 'ghost'"),
    Case("gen-bad-stop", "generate", {**GEN, "stop": [1, 2]}, "stop must be a string or a list"),
    Case("gen-bad-seed", "generate", {**GEN, "seed": "lucky"}, "seed must be an integer"),
    Case("gen-bad-messages", "generate", {"messages": [{"role": "robot", "content": "x"}]}, "role 'system', 'user'"),
    Case("gen-messages-not-list", "generate", {"messages": "hello"}, "messages must be a non-empty list"),
    Case("gen-prompt-and-messages", "generate", {**GEN, "messages": [{"role": "user", "content": "x"}]},
         "either prompt or messages"),
    Case("gen-num-return-zero", "generate", {**GEN, "num_return_sequences": 0}, "num_return_sequences must be >= 1"),
    Case("gen-json-schema-not-a-schema", "generate", {**GEN, "json_schema": {"type": "nonsense"}},
         "not a usable JSON schema"),
    Case("gen-json-schema-a-string", "generate", {**GEN, "json_schema": "an object please"},
         "must be a JSON schema object"),
    Case("gen-unsupported-transformers-option", "generate", {**GEN, "bad_words_ids": [[1]]},
         "not supported by llm_module"),
    # ---- setup
    Case("setup-missing-model-dir", "setup", {"model_name": "./no/such/model"}, "does not exist"),
    Case("setup-dir-not-a-model", "setup", {"model_name": "adapters/tiny"}, "holds no config.json"),
    Case("setup-missing-gguf", "setup", {"model_name": "nothing.gguf"}, "does not exist"),
    Case("setup-bad-device", "setup", {"model_name": "model", "device": "tpu"}, "device must be one of"),
    Case("setup-bad-dtype", "setup", {"model_name": "model", "dtype": "float8"}, "dtype must be one of"),
    Case("setup-cuda-without-gpu", "setup", {"model_name": "model", "device": "cuda"}, "no CUDA GPU is visible"),
    Case("setup-unknown-option", "setup", {"model_name": "model", "devise": "cpu"}, "Did you mean 'device'"),
    Case("setup-model-kwargs-not-dict", "setup", {"model_name": "model", "model_kwargs": "fast"},
         "model_kwargs must be an object"),
    Case("setup-adapters-not-dict", "setup", {"model_name": "model", "adapters": ["a"]}, "adapters must be an object"),
    Case("setup-adapter-missing", "setup", {"model_name": "model", "adapters": {"x": "nowhere"}}, "does not exist"),
    Case("setup-escape-data-root", "setup", {"model_name": "../../etc"}, "outside the data root", CONFINED),
    # ---- adapters
    Case("adapter-missing-path", "load_adapter", {"path": "nowhere", "name": "x"}, "does not exist"),
    Case("adapter-not-an-adapter", "load_adapter", {"path": "not_an_adapter", "name": "x"}, "not a LoRA adapter"),
    Case("adapter-bad-name", "load_adapter", {"path": "adapters/tiny", "name": "no spaces!"}, "is not valid"),
    Case("adapter-name-taken", "load_adapter", {"path": "adapters/tiny", "name": "tiny"}, "already loaded"),
    Case("adapter-foreign-base", "load_adapter", {"path": "adapters/foreign", "name": "foreign"},
         "another base model"),
    Case("adapter-escape-dotdot", "load_adapter", {"path": "../../../etc", "name": "x"}, "outside the data root",
         CONFINED),
    Case("adapter-escape-absolute", "load_adapter", {"path": "/etc", "name": "x"}, "outside the data root", CONFINED),
    Case("adapter-escape-symlink", "load_adapter", {"path": "link_out", "name": "x"}, "outside the data root",
         CONFINED),
    Case("adapter-unload-unknown", "unload_adapter", {"name": "ghost"}, "No adapter named 'ghost'"),
    Case("adapter-default-unknown", "set_default_adapter", {"name": "ghost"}, "No adapter named 'ghost'"),
    # ---- train and evaluate: data files
    Case("train-missing-file", "train", {"data_file": "nope.json", "output_dir": "o"}, "does not exist"),
    Case("train-empty-file", "train", {"data_file": "empty.json", "output_dir": "o"}, "is not valid JSON"),
    Case("train-malformed-json", "train", {"data_file": "malformed.json", "output_dir": "o"}, "is not valid JSON"),
    Case("train-non-utf8", "train", {"data_file": "nonutf8.json", "output_dir": "o"}, "give a UTF-8 text file"),
    Case("train-no-known-fields", "train", {"data_file": "no_fields.json", "output_dir": "o"},
         "Cannot tell the data format"),
    Case("train-wrong-types", "train", {"data_file": "wrong_types.json", "output_dir": "o"},
         "'instruction' must be a string"),
    Case("train-zero-records", "train", {"data_file": "empty_list.json", "output_dir": "o"}, "holds no records"),
    Case("train-blank-records", "train", {"data_file": "blank_records.json", "output_dir": "o"},
         "missing or empty 'instruction'"),
    Case("train-unsupported-type", "train", {"data_file": "data.xml", "output_dir": "o"}, "unsupported type .xml"),
    Case("train-unknown-format", "train", {"data_file": "good.json", "output_dir": "o", "data_format": "yaml"},
         "data_format 'yaml' is not known"),
    Case("train-cutoff-shorter-than-prompt", "train",
         {"data_file": "long_prompt.json", "output_dir": "o", "training_params": {"CUTOFF_LEN": 16}},
         "raise CUTOFF_LEN"),
    # ---- train: parameters and folders
    Case("train-zero-micro-batch", "train",
         {"data_file": "good.json", "output_dir": "o", "training_params": {"MICRO_BATCH_SIZE": 0}},
         "MICRO_BATCH_SIZE must be a positive number"),
    Case("train-negative-batch", "train",
         {"data_file": "good.json", "output_dir": "o", "training_params": {"BATCH_SIZE": -4}},
         "BATCH_SIZE must be a positive number"),
    Case("train-zero-epochs", "train", {"data_file": "good.json", "output_dir": "o", "training_params": {"EPOCHS": 0}},
         "EPOCHS must be a positive number"),
    Case("train-learning-rate-string", "train",
         {"data_file": "good.json", "output_dir": "o", "training_params": {"LEARNING_RATE": "fast"}},
         "LEARNING_RATE must be a positive number"),
    Case("train-params-not-object", "train", {"data_file": "good.json", "output_dir": "o", "training_params": [1]},
         "training_params must be an object"),
    Case("train-unknown-param", "train", {"data_file": "good.json", "output_dir": "o", "training_params": {"EPOCH": 2}},
         "Did you mean 'EPOCHS'"),
    Case("train-unknown-option", "train", {"data_file": "good.json", "output_dir": "o", "val_set_sise": 2},
         "Did you mean 'val_set_size'"),
    Case("train-base-rewriting-init", "train",
         {"data_file": "good.json", "output_dir": "o", "lora_config_kwargs": {"init_lora_weights": "pissa"}},
         "rewrites the base model's weights"),
    Case("train-bad-resume", "train", {"data_file": "good.json", "output_dir": "o", "resume_from_checkpoint": 3},
         "resume_from_checkpoint must be true, false or a checkpoint path"),
    Case("train-into-foreign-folder", "train", {"data_file": "good.json", "output_dir": "occupied"},
         "is not a previous llm.train run"),
    Case("train-into-live-adapter", "train", {"data_file": "good.json", "output_dir": "adapters/tiny"},
         "would overwrite it"),
    Case("train-escape-data", "train", {"data_file": "../../etc/passwd", "output_dir": "o"}, "outside the data root",
         CONFINED),
    Case("train-escape-output", "train", {"data_file": "good.json", "output_dir": "/tmp/elsewhere"},
         "outside the data root", CONFINED),
    Case("evaluate-missing-file", "evaluate", {"data_file": "nope.json"}, "does not exist"),
    Case("evaluate-unknown-adapter", "evaluate", {"data_file": "good.json", "adapter": "ghost"},
         "No adapter named 'ghost'"),
    Case("evaluate-malformed", "evaluate", {"data_file": "malformed.json"}, "is not valid JSON"),
    # ---- jobs
    Case("job-unknown-id", "job_status", {"job_id": "nope"}, "No job with id 'nope'"),
    Case("job-cancel-unknown", "cancel_job", {"job_id": "nope"}, "No job with id 'nope'"),
]


# The part of each message that names the fix (a message must say what to do, not only what is wrong).
FIXES = {
    "gen-unknown-option": "Did you mean", "gen-negative-max-new-tokens": "must be >= 1",
    "gen-string-max-new-tokens": "must be an integer", "gen-zero-temperature": "use do_sample=False",
    "gen-top-p-out-of-range": "must be in (0, 1]", "gen-do-sample-string": "must be true or false",
    "gen-bad-top-k": "must be >= 0", "gen-empty-prompt": "give some text", "gen-no-prompt": "must be a string",
    "gen-prompt-number": "must be a string", "gen-prompt-list-with-number": "give some text",
    "gen-thousands-of-prompts": "split them into several calls", "gen-prompt-over-context": "shorten the prompt",
    "gen-unknown-adapter": "Load it with llm.load_adapter", "gen-bad-stop": "must be a string or a list",
    "gen-bad-seed": "must be an integer", "gen-bad-messages": "must be an object with role",
    "gen-messages-not-list": "must be a non-empty list", "gen-prompt-and-messages": "Pass either prompt or messages",
    "gen-num-return-zero": "must be >= 1", "gen-json-schema-not-a-schema": "give a JSON schema object",
    "gen-json-schema-a-string": "must be a JSON schema object", "gen-unsupported-transformers-option":
    "the supported ones are", "setup-missing-model-dir": "check the path", "setup-dir-not-a-model":
    "pass it as lora_dir=", "setup-missing-gguf": "check the path", "setup-bad-device": "must be one of",
    "setup-bad-dtype": "must be one of", "setup-cuda-without-gpu": "use device='cpu'",
    "setup-unknown-option": "Did you mean 'device'", "setup-model-kwargs-not-dict": "must be an object",
    "setup-adapters-not-dict": "must be an object {name: path}", "setup-adapter-missing": "check the path",
    "setup-escape-data-root": "give a path inside it", "adapter-missing-path": "check the path",
    "adapter-not-an-adapter": "Give a folder written by llm.train", "adapter-bad-name": "use 1-64 letters",
    "adapter-name-taken": "unload it first or pick another name", "adapter-foreign-base": "load that model",
    "adapter-escape-dotdot": "give a path inside it", "adapter-escape-absolute": "give a path inside it",
    "adapter-escape-symlink": "give a path inside it", "adapter-unload-unknown": "Load it with llm.load_adapter",
    "adapter-default-unknown": "Load it with llm.load_adapter", "train-missing-file": "check the path",
    "train-empty-file": "holds an array of records", "train-malformed-json": "holds an array of records",
    "train-non-utf8": "give a UTF-8 text file", "train-no-known-fields": "or pass data_format=",
    "train-wrong-types": "fix that record", "train-zero-records": "give at least one example",
    "train-blank-records": "fix that record", "train-unsupported-type": "use one of .json",
    "train-unknown-format": "Use one of auto", "train-cutoff-shorter-than-prompt": "raise CUTOFF_LEN",
    "train-zero-micro-batch": "must be a positive number", "train-negative-batch": "must be a positive number",
    "train-zero-epochs": "must be a positive number", "train-learning-rate-string": "must be a positive number",
    "train-params-not-object": "must be an object such as", "train-unknown-param": "Did you mean 'EPOCHS'",
    "train-unknown-option": "Did you mean 'val_set_size'", "train-bad-resume": "must be true, false or a checkpoint",
    "train-into-foreign-folder": "give an empty or new folder", "train-into-live-adapter": "Pick a new output_dir",
    "train-escape-data": "give a path inside it", "train-escape-output": "give a path inside it",
    "evaluate-missing-file": "check the path", "evaluate-unknown-adapter": "Load it with llm.load_adapter",
    "evaluate-malformed": "holds an array of records", "job-unknown-id": "list_jobs() shows the known ones",
    "job-cancel-unknown": "list_jobs() shows the known ones", "train-base-rewriting-init": "Leave that setting out",
}


def test_every_case_names_its_fix():
    assert set(FIXES) == {case.id for case in CASES}


def check_message(case: Case, message: str) -> None:
    assert case.phrase in message, (case.id, message)
    assert FIXES[case.id] in message, (case.id, "names no fix:", message)


def build_data_root(root: Path, tiny_model_dir: Path, tiny_adapter_dir: Path) -> Path:
    """Files the cases point at, inside one folder."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_model_dir, root / "model")
    shutil.copytree(tiny_adapter_dir, root / "adapters" / "tiny")
    foreign = root / "adapters" / "foreign"
    shutil.copytree(tiny_adapter_dir, foreign)
    weights = foreign / "adapter_model.safetensors"
    import torch

    save_file({k: torch.zeros(v.shape[0] * 2, v.shape[1] * 2) for k, v in load_file(str(weights)).items()},
              str(weights))
    (root / "not_an_adapter").mkdir()
    (root / "not_an_adapter" / "notes.txt").write_text("hello")
    (root / "link_out").symlink_to("/etc", target_is_directory=True)
    good = [{"instruction": f"Q{i}?", "input": "", "output": f"A{i}."} for i in range(4)]
    files = {
        "good.json": json.dumps(good), "empty.json": "", "malformed.json": '[{"instruction": ',
        "no_fields.json": json.dumps([{"question": "x"}]), "empty_list.json": "[]",
        "wrong_types.json": json.dumps([{"instruction": 5, "input": "", "output": ["a"]}]),
        "blank_records.json": json.dumps([{"instruction": "", "input": "", "output": ""}]), "data.xml": "<a/>",
        "long_prompt.json": json.dumps([{"instruction": "word " * 400, "input": "", "output": "ok"}]),
    }
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "nonutf8.json").write_bytes(b'[{"instruction": "caf\xe9", "output": "x"}]')
    (root / "occupied").mkdir()
    (root / "occupied" / "thesis.docx").write_text("a user's own file")
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, tiny_model_dir, tiny_adapter_dir) -> Path:
    return build_data_root(tmp_path_factory.mktemp("bad-input-root"), tiny_model_dir, tiny_adapter_dir)


def _reference(call) -> dict:
    """What the model and the adapter answer; the same must hold after every bad call."""
    return {
        "base": call("generate", {**GEN, "max_new_tokens": 6, "adapter": "base"}),
        "tiny": call("generate", {**GEN, "max_new_tokens": 6, "adapter": "tiny"}),
    }


# ------------------------------------------------------------------------------ Python API
@pytest.fixture(scope="module")
def python_engine(data_root, tmp_path_factory):
    engine = Engine(Settings(data_root=data_root), state_file=StateFile(tmp_path_factory.mktemp("py") / "state.json"))
    engine.setup("model", adapters={"tiny": "adapters/tiny"})
    yield engine
    engine.close()


def test_catalogue_through_the_python_api(python_engine, data_root, monkeypatch):
    monkeypatch.chdir(data_root)

    def _python_call(action: str, ctx: dict):
        return ACTIONS[action](python_engine, **ctx)

    before = _reference(_python_call)
    cases = [c for c in CASES if "python" in c.transports]
    for case in cases:
        with pytest.raises(LLMError) as info:
            _python_call(case.action, case.ctx)
        check_message(case, str(info.value))
        assert 400 <= info.value.status < 500, (case.id, info.value.status)
    assert _reference(_python_call) == before
    assert (data_root / "occupied" / "thesis.docx").read_text() == "a user's own file"  # nothing of theirs lost
    assert sorted(p.name for p in (data_root / "occupied").iterdir()) == ["thesis.docx"]
    print(f"\nbad-input catalogue (python): {len(cases)} cases refused, model and adapter unchanged")


# ------------------------------------------------------------------------------ HTTP
@pytest.fixture(scope="module")
def server(data_root, tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("bad-input-server"), "--model", str(data_root / "model"),
                       "--adapter", f"tiny={data_root / 'adapters' / 'tiny'}", "--data-root", str(data_root))
    yield srv
    srv.stop()


def test_catalogue_through_http(server):
    def call(action, ctx):
        res = requests.post(f"{server.url}/{action}", json=ctx, timeout=120)
        return res.status_code, res.json()

    before = _reference(call)
    cases = [c for c in CASES if "http" in c.transports]
    for case in cases:
        status, body = call(case.action, case.ctx)
        assert 400 <= status < 500, (case.id, status, body)
        check_message(case, body["error"]["message"])
    assert requests.get(server.url + "/healthz", timeout=5).status_code == 200
    assert _reference(call) == before
    print(f"\nbad-input catalogue (http): {len(cases)} cases refused with 4xx JSON, server up")


# ------------------------------------------------------------------------------ jsctl
@pytest.mark.e2e
def test_catalogue_through_jsctl(data_root, tmp_path):
    session = JacSession(data_root, env={"LLM_MODULE_HOME": str(tmp_path / "home"),
                                         "LLM_MODULE_CACHE": str(Settings().models_dir)})
    cases = [c for c in CASES if "jsctl" in c.transports]
    setup = {"model_name": str(data_root / "model"), "adapters": {"tiny": str(data_root / "adapters" / "tiny")}}
    probes = [f"actions call llm.generate -ctx '{json.dumps({**GEN, 'max_new_tokens': 6, 'adapter': name})}'"
              for name in ("tiny", "base")]
    commands = [f"actions load module llm_module.llm -ctx '{json.dumps(setup)}'", *probes]
    commands += [f"actions call llm.{c.action} -ctx '{json.dumps(c.ctx)}'" for c in cases]
    commands += probes
    values, out = session.script(*commands, timeout=900)
    calls = values[1:]
    assert len(calls) == len(cases) + 4, out[-3000:]
    before, after = calls[:2], calls[-2:]
    assert all(c["success"] for c in before) and after == before, "the adapter and the base answer as before"
    assert before[0] != before[1]  # the adapter's answer is not the base model's
    errors = [line.split(": ", 2)[-1] for line in out.splitlines() if "Error calling action llm." in line]
    assert len(errors) == len(cases), out[-3000:]
    for case, result, message in zip(cases, calls[2:-2], errors, strict=True):
        assert result["success"] is False, case.id
        check_message(case, message)
    print(f"\nbad-input catalogue (jsctl): {len(cases)} cases refused, adapter unchanged")
