"""llm.export (issue 22) and portable adapters (issue 21), on the tiny random Llama.

The proof is the round trip: train an adapter, export the merged model as GGUF, load that file in a
fresh engine with ``setup(model_name=<file>.gguf)`` and get the adapter's greedy answers back. The
LoRA GGUF is checked against the merged GGUF with llama.cpp's own arithmetic (W + alpha / r * B A on
its tensor layout); bench/export_roundtrip.py runs both files in a real llama.cpp build.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from llm_module import Engine, Settings
from llm_module.engine.state import StateFile
from llm_module.errors import Conflict, InvalidInput, NotFound

RECORDS = [{"instruction": f"What is the code of item {i}?", "input": "", "output": f"Item {i} has code Z{i}."}
           for i in range(8)]
QUESTIONS = [r["instruction"] for r in RECORDS[:4]]
PARAMS = {"MICRO_BATCH_SIZE": 4, "BATCH_SIZE": 4, "EPOCHS": 12, "LEARNING_RATE": 1e-2, "CUTOFF_LEN": 128,
          "LORA_R": 8, "LORA_ALPHA": 16}


def answers(engine: Engine, adapter: str) -> list[str]:
    out = engine.generate(QUESTIONS, chat=True, adapter=adapter, do_sample=False, max_new_tokens=12)
    return [o[0]["generated_text"] for o in out]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """An engine over the tiny model with an adapter trained on RECORDS, its answers, and the base's."""
    root = tmp_path_factory.mktemp("export")
    data = root / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    engine = Engine(Settings(home=root / "home"), state_file=StateFile(root / "state.json"))
    engine.setup(str(tiny_model_dir))
    # protect_general=0: on the tiny random model the guard holds 3/4 of each layer, and these tests want an
    # adapter that has clearly learned the records (what is checked is the export, not the guard)
    result = engine.train(str(data), str(root / "runs" / "shop"), PARAMS, show_progress=False,
                          check_forgetting=False, protect_general=0)
    tuned, base = answers(engine, "shop"), answers(engine, "base")
    assert tuned != base  # the adapter changes what the model says
    yield SimpleNamespace(engine=engine, root=root, result=result, tuned=tuned, base=base,
                          adapter_dir=Path(result["adapter_dir"]))
    engine.close()


def fresh_engine(root: Path, name: str) -> Engine:
    return Engine(Settings(home=root / name), state_file=StateFile(root / f"{name}.json"))


# ------------------------------------------------------------------ gguf: the round trip
def test_gguf_round_trip_gives_the_trained_answers_back(trained):
    out = trained.root / "gguf"
    result = trained.engine.export("shop", str(out), "gguf", quantization=["f32", "f16", "q8_0"])
    names = [f["file"] for f in result["files"]]
    assert names[:3] == ["shop-f32.gguf", "shop-f16.gguf", "shop-q8_0.gguf"] and "Modelfile" in names
    assert (out / "llm_module_export.json").is_file()
    engine = fresh_engine(trained.root, "from-gguf")
    try:
        engine.setup(model_name=str(out / "shop-f32.gguf"))
        assert answers(engine, "base") == trained.tuned  # the merged model answers as base + adapter did
        engine.setup(model_name=str(out / "shop-f16.gguf"))
        assert answers(engine, "base") == trained.tuned
    finally:
        engine.close()


def test_modelfile_carries_the_chat_template_stop_tokens_and_system_prompt(trained):
    out = trained.root / "ollama"
    trained.engine.export("shop", str(out), "ollama")
    text = (out / "Modelfile").read_text()
    assert "FROM ./shop-f16.gguf" in text
    assert "<|im_start|>assistant" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in text  # what training rendered


def test_gguf_metadata_is_what_llama_cpp_reads(trained):
    from gguf import GGUFReader

    out = trained.root / "meta"
    trained.engine.export(str(trained.adapter_dir), str(out), "gguf", quantization="q4_0")
    reader = GGUFReader(str(out / "shop-q4_0.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith(("GGUF", "tokenizer.ggml.t",
                                                                                     "tokenizer.ggml.merges"))}
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "model"
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "smollm"
    assert fields["tokenizer.ggml.eos_token_id"] == 2 and "<|im_start|>" in fields["tokenizer.chat_template"]
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count_kv"] == 2
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32" and "output.weight" not in types  # tied: token_embd is output


# ------------------------------------------------------------------ hf
def test_hf_export_loads_with_plain_transformers(trained):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = trained.root / "hf"
    trained.engine.export("shop", str(out), "hf")
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True,
                                           tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out_ids = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out_ids[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text == trained.tuned[0]


# ------------------------------------------------------------------ lora-gguf
def test_lora_gguf_is_llama_cpp_arithmetic_of_the_merged_model(trained):
    """W_merged = W_base + alpha / r * B @ A on llama.cpp's tensors, with the names and shapes it checks."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out = trained.root / "lora"
    result = trained.engine.export("shop", str(out), "lora-gguf")
    assert [f["file"] for f in result["files"]][:1] == ["shop-lora-f32.gguf"]
    lora = GGUFReader(str(out / "shop-lora-f32.gguf"))
    meta = {k: f.contents() for k, f in lora.fields.items() if not k.startswith("GGUF")}
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == PARAMS["LORA_ALPHA"] and meta["general.architecture"] == "llama"
    trained.engine.export("shop", str(trained.root / "merged32"), "gguf", quantization="f32")
    base_dir = trained.root / "base32"
    _export_base(trained, base_dir)
    merged = {t.name: dequantize(t.data, t.tensor_type) for t in GGUFReader(str(trained.root / "merged32" /
                                                                              "shop-f32.gguf")).tensors}
    base = {t.name: dequantize(t.data, t.tensor_type) for t in GGUFReader(str(base_dir / "base-f32.gguf")).tensors}
    tensors = {t.name: np.array(t.data) for t in lora.tensors}
    pairs = sorted({name.rsplit(".", 1)[0] for name in tensors})
    assert "blk.0.attn_q.weight" in pairs and "blk.1.ffn_down.weight" in pairs
    scale = PARAMS["LORA_ALPHA"] / PARAMS["LORA_R"]
    for name in pairs:
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]  # numpy shapes [r, in] and [out, r]
        assert a.shape[0] == b.shape[1] == PARAMS["LORA_R"] and a.shape[1] == base[name].shape[1]
        np.testing.assert_allclose(base[name] + scale * (b @ a), merged[name], atol=2e-5)


def _export_base(trained, folder: Path) -> None:
    """The base model alone as an f32 GGUF (an adapter whose update is zero, merged)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    zero = trained.root / "zero-adapter"
    shutil.copytree(trained.adapter_dir, zero, dirs_exist_ok=True)
    weights = load_file(str(zero / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in weights.items()}, str(zero / "adapter_model.safetensors"))
    trained.engine.export(str(zero), str(folder), "gguf", quantization="f32", name="base")


# ------------------------------------------------------------------ checks
def test_export_refuses_what_it_cannot_do(trained, tmp_path):
    engine = trained.engine
    with pytest.raises(InvalidInput, match="'gguf'"):
        engine.export("shop", str(tmp_path / "x"), "ggfu")
    with pytest.raises(InvalidInput, match="q4_0"):
        engine.export("shop", str(tmp_path / "x"), "gguf", quantization="q3_k")
    with pytest.raises(InvalidInput, match="'quantization'"):
        engine.export("shop", str(tmp_path / "x"), "gguf", quantisation="f16")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    with pytest.raises(Conflict, match="overwrite"):
        engine.export("shop", str(mine), "hf")
    assert (mine / "thesis.tex").read_text() == "x"
    with pytest.raises(NotFound, match="does not exist"):
        engine.export(str(tmp_path / "nowhere"), str(tmp_path / "x"), "hf")


def test_dora_adapter_is_refused_as_lora_gguf_but_merges(trained, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(trained.engine.host.loaded.source))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    peft_model.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(InvalidInput, match="DoRA"):
        trained.engine.export(str(tmp_path / "dora"), str(tmp_path / "o1"), "lora-gguf")
    result = trained.engine.export(str(tmp_path / "dora"), str(tmp_path / "o2"), "hf")
    assert any(f["file"] == "model.safetensors" for f in result["files"])


def test_cli_export(trained, tmp_path, monkeypatch, capsys, tiny_model_dir):
    from llm_module.cli import main

    monkeypatch.setenv("LLM_MODULE_HOME", str(tmp_path / "home"))
    code = main(["export", str(trained.adapter_dir.parent), str(tmp_path / "cli"), "--format", "lora-gguf",
                 "--quantization", "f16", "--model", str(tiny_model_dir)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["format"] == "lora-gguf" and (tmp_path / "cli" / "shop-lora-f16.gguf").is_file()


# ------------------------------------------------------------------ portable adapters (issue 21)
def test_adapter_config_names_the_base_as_given_and_meta_the_exact_source(trained, tiny_model_dir):
    config = json.loads((trained.adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    meta = json.loads((trained.adapter_dir / "llm_module.json").read_text())
    assert meta["base_model_id"] == str(tiny_model_dir) and meta["base_source"]["kind"] == "folder"


def test_default_model_adapter_names_the_hub_id_and_the_gguf_hash():
    from llm_module.loader import DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID, convert_gguf, default_gguf_path
    from llm_module.training.provenance import base_provenance, sha256_of

    folder = convert_gguf(default_gguf_path(), Settings().models_dir)  # the cache: converted once
    model = SimpleNamespace(config=SimpleNamespace(_name_or_path=str(folder)))
    found = base_provenance(model, DEFAULT_MODEL)
    assert found["base_model_id"] == DEFAULT_MODEL_HUB_ID  # not this machine's cache folder
    assert found["source"] == {"kind": "gguf", "path": str(default_gguf_path()), "converted_dir": str(folder),
                               "sha256": sha256_of(default_gguf_path())}


def test_adapter_trained_on_a_gguf_names_that_file(trained):
    out = trained.root / "gguf-base"
    trained.engine.export("shop", str(out), "gguf", quantization="f32", name="merged")
    gguf_file = out / "merged-f32.gguf"
    engine = fresh_engine(trained.root, "on-gguf")
    try:
        engine.setup(model_name=str(gguf_file))
        data = trained.root / "one.jsonl"
        data.write_text(json.dumps(RECORDS[0]) + "\n")
        result = engine.train(str(data), str(trained.root / "runs" / "on-gguf"), {**PARAMS, "EPOCHS": 1},
                              show_progress=False, check_forgetting=False)
    finally:
        engine.close()
    config = json.loads((Path(result["adapter_dir"]) / "adapter_config.json").read_text())
    meta = json.loads((Path(result["adapter_dir"]) / "llm_module.json").read_text())
    assert config["base_model_name_or_path"] == str(gguf_file)
    assert meta["base_source"]["kind"] == "gguf" and len(meta["base_source"]["sha256"]) == 64


def test_plain_peft_loads_the_trained_adapter_in_a_new_process(trained):
    """No llm_module: transformers + peft, the base named by adapter_config.json, the adapter's answer."""
    script = f"""
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
adapter = {str(trained.adapter_dir)!r}
base_id = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_id), adapter).eval()
tok = AutoTokenizer.from_pretrained(base_id)
prompt = tok.apply_chat_template([{{"role": "user", "content": {QUESTIONS[0]!r}}}], add_generation_prompt=True,
                                 tokenize=False)
ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
with torch.inference_mode():
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
print(json.dumps(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == trained.tuned[0]


def test_engine_loads_an_adapter_saved_by_plain_peft(trained, tiny_adapter_dir):
    engine = trained.engine
    info = engine.load_adapter(str(tiny_adapter_dir), "plain-peft")
    try:
        assert info["name"] == "plain-peft"
        assert answers(engine, "plain-peft") != trained.base  # its weights are in use
    finally:
        engine.unload_adapter("plain-peft")
