"""Correctness of each model patch of llm_module.runtime (the bench measures the speed).

Each optimisation must compute what it replaces: packed weights reproduce their dequantized
reference, a GGUF Q4_1 grid survives int4 packing exactly, LoRA adapters still apply on a
quantized base, and on the real default model the perplexity of a held-out text moves < 1 %.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from llm_module.runtime.norms import use_fused_rms_norm
from llm_module.runtime.prepare import is_gguf_conversion, prepare, resolve_quant_mode
from llm_module.runtime.quantize import (
    COMPUTE_DTYPE,
    INT4_GROUP_SIZE,
    SharedInputCast,
    WeightOnlyLinear,
    quantize_linears,
)
from llm_module.settings import Settings

HELD_OUT = Path(__file__).resolve().parents[1] / "bench" / "data" / "heldout.txt"


def _linear(out_features: int = 96, in_features: int = 128, bias: bool = False) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, bias=bias)


def _bf16_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What a packed layer computes: bf16 activations against the dequantized weight."""
    return x.to(COMPUTE_DTYPE).float() @ weight.t()


def test_int8_matches_its_dequantized_weight():
    from llm_module.runtime.quantize import OWN_INT8, _int8_grid

    linear = _linear(bias=True)
    packed = WeightOnlyLinear(linear, "int8")
    x = torch.randn(5, 128)
    if packed.kernel == OWN_INT8:  # our kernel: int8 per group of 32 inputs, the input read as int8 too
        codes, scales = _int8_grid(linear.weight.detach())
        dequantized = (codes.float().view(96, 4, 32) * scales.float()[..., None]).view(96, 128)
        expected = x @ dequantized.t() + linear.bias
    else:  # torch's: int8 per row, bf16 inputs
        dequantized = packed.weight.float() * packed.scales.float()[:, None]
        expected = _bf16_reference(x, dequantized) + linear.bias
    torch.testing.assert_close(packed(x), expected, rtol=2e-2, atol=2e-2)
    assert (dequantized - linear.weight).abs().max() <= linear.weight.abs().max() / 127


def test_int4_reproduces_a_q4_1_grid_exactly():
    """Weights already on a 4-bit grid with one scale and minimum per 32 values (as in a GGUF Q4_1 file)."""
    torch.manual_seed(1)
    rows, cols = 64, 128
    groups = cols // INT4_GROUP_SIZE
    codes = torch.randint(0, 16, (rows, groups, INT4_GROUP_SIZE))
    codes[..., 0], codes[..., 1] = 0, 15  # each block uses its lowest and highest code, as real blocks do
    scales = (torch.rand(rows, groups, 1) * 0.01 + 0.001).to(COMPUTE_DTYPE).float()
    minimums = (-8 * scales).to(COMPUTE_DTYPE).float()  # keeps zero = min + 8 * scale exact in bf16
    weight = (codes * scales + minimums).reshape(rows, cols)
    linear = nn.Linear(cols, rows, bias=False)
    linear.weight.data = weight
    x = torch.randn(3, cols)
    layer = WeightOnlyLinear(linear, "int4", fine_input=True)
    if layer.mins is not None:  # our kernel: the input read in two int8 parts moves it by ~1e-5 of its max
        torch.testing.assert_close(layer(x), x @ weight.t(), rtol=1e-3, atol=1e-4)
    else:  # torch's kernel reads the input in bf16
        torch.testing.assert_close(layer(x), _bf16_reference(x, weight), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("leading", [(1,), (4,), (2, 3)])
def test_packed_layers_keep_the_input_shape_and_dtype(leading):
    linear = _linear()
    for mode in ("int8", "int4"):
        out = WeightOnlyLinear(linear, mode)(torch.randn(*leading, 128))
        assert out.shape == (*leading, 96) and out.dtype == torch.float32


def test_quantize_linears_replaces_every_linear_and_unties_the_head(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    reference = copy.deepcopy(model)
    count = quantize_linears(model, "int4")
    assert count == 2 * 7 + 1  # q k v o gate up down per layer, and the output head
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert model.config.tie_word_embeddings is False
    ids = torch.tensor([[1, 42, 7, 99, 3]])
    with torch.inference_mode():
        got, want = model(ids).logits, reference(ids).logits
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.98
    assert quantize_linears(reference, "none") == 0


def test_lora_still_applies_on_a_quantized_base(tiny_model_dir, tiny_adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    quantize_linears(base, "int8")
    ids = torch.tensor([[1, 42, 7, 99, 3]])
    with torch.inference_mode():
        plain = base(ids).logits
        tuned_model = PeftModel.from_pretrained(base, str(tiny_adapter_dir), adapter_name="a").eval()
        tuned = tuned_model(ids).logits
        mixed = tuned_model(ids.repeat(2, 1), adapter_names=["a", "__base__"]).logits
    lora_params = [p for n, p in tuned_model.named_parameters() if "lora_" in n]
    assert lora_params and all(p.dtype == torch.float32 for p in lora_params)
    assert (tuned - plain).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(mixed[0], tuned[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[1], plain[0], rtol=1e-4, atol=1e-4)


@pytest.fixture
def torch_int4_kernel(monkeypatch):
    """Packs int4 layers for torch's kernel, as on a CPU without AVX-512 VNNI (our kernel takes
    float32 rows and needs no bf16 cast)."""
    from llm_module.runtime import int4_kernel

    monkeypatch.setitem(int4_kernel._loaded, "module", None)


def test_sibling_projections_share_one_cast_of_their_input(tiny_model_dir, torch_int4_kernel):
    """q/k/v (and gate/up) cast their common input to bf16 once; the logits are bitwise those of
    layers casting for themselves, and a sibling handed another tensor casts that one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    quantize_linears(model, "int4")
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attention.q_proj.input_cast is attention.v_proj.input_cast is not None
    assert mlp.gate_proj.input_cast is mlp.up_proj.input_cast is not mlp.down_proj.input_cast
    ids = torch.tensor([[1, 42, 7, 99, 3], [5, 6, 7, 8, 9]])
    with torch.inference_mode():
        shared = model(ids).logits
        for module in model.modules():
            if isinstance(module, WeightOnlyLinear):
                module.input_cast = None
        alone = model(ids).logits
    assert torch.equal(shared, alone)

    first, second = WeightOnlyLinear(_linear(), "int4"), WeightOnlyLinear(_linear(64), "int4")
    first.input_cast = second.input_cast = SharedInputCast(readers=2)
    x, y = torch.randn(3, 128), torch.randn(3, 128)
    first(x)
    assert torch.equal(second(y), WeightOnlyLinear(_linear(64), "int4")(y))
    first(x), second(x)
    assert first.input_cast.last is None  # both siblings read it: the input is not held any longer


def test_fused_rms_norm_is_bitwise_transformers_rms_norm(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for norm in (model.model.norm, reference.model.norm):
            norm.weight.copy_(torch.linspace(0.5, 1.5, norm.weight.numel()))  # not all ones
    assert use_fused_rms_norm(model) == 2 * 2 + 1  # two per layer and the final one
    x = torch.randn(2, 5, model.config.hidden_size) * 3
    assert torch.equal(model.model.norm(x), reference.model.norm(x))
    ids = torch.tensor([[1, 42, 7, 99, 3]])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    copied = copy.deepcopy(model)  # its norms read its own weights
    with torch.no_grad():
        copied.model.norm.weight.mul_(2)
    assert not torch.equal(copied.model.norm(x), model.model.norm(x))
    assert use_fused_rms_norm(model.to(torch.bfloat16)) == 0  # other dtypes keep transformers' code


def test_quant_mode_policy(monkeypatch):
    assert resolve_quant_mode("auto", "cpu", torch.float32) == "int4"
    assert resolve_quant_mode("auto", "cpu", torch.float32, from_gguf=False) == "none"  # full precision
    assert resolve_quant_mode("auto", "cpu", torch.bfloat16) == "none"
    assert resolve_quant_mode("auto", "cuda", torch.float32) == "none"
    assert resolve_quant_mode("none", "cpu", torch.float32) == "none"
    assert resolve_quant_mode(None, "cpu", torch.float32) == "int4"
    monkeypatch.setenv("LLM_MODULE_QUANTIZE", "none")  # the setting, read once by Settings
    assert Settings().quantize == "none"
    with pytest.raises(ValueError):
        resolve_quant_mode("int3", "cpu", torch.float32)


def test_only_a_4bit_gguf_conversion_gets_int4_by_default(tmp_path):
    from llm_module.loader import convert_gguf, default_gguf_path

    assert is_gguf_conversion(str(convert_gguf(default_gguf_path(), Settings().models_dir)))
    (tmp_path / "llm_module_source.json").write_text('{"gguf": "/m/model.Q8_0.gguf"}')
    assert not is_gguf_conversion(str(tmp_path))
    assert not is_gguf_conversion(str(tmp_path / "plain-hf-dir"))


def held_out_perplexity(model, tokenizer, text: str, window: int = 256) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, ids.shape[1] - 1, window):
            chunk = ids[:, start:start + window + 1]
            logits = model(chunk[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum")
            total, count = total + float(loss), count + chunk.shape[1] - 1
    return math.exp(total / count)


@pytest.mark.slow
@pytest.mark.parametrize("mode, dense", [("int8", False), ("int4", False), ("int4", True)])
def test_default_model_perplexity_within_one_percent(mode, dense):
    """Windows of 256 tokens: the packed kernel, or with ``dense`` the bf16 copy prompts are read with."""
    from llm_module.loader import load_model

    loaded = load_model(models_dir=Settings().models_dir)
    text = HELD_OUT.read_text(encoding="utf-8")
    reference = held_out_perplexity(loaded.model, loaded.tokenizer, text)
    quantize_linears(loaded.model, mode, dense_prefill=dense)
    quantized = held_out_perplexity(loaded.model, loaded.tokenizer, text)
    assert abs(quantized / reference - 1) < 0.01, (mode, reference, quantized)


def test_packed_weights_cache_gives_the_same_model(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from llm_module.runtime.quantize import DENSE_MIN_ROWS, packed_cache_file

    settings = Settings(cache=tmp_path / "cache", dense_prefill=True)
    cache_file = packed_cache_file(str(tiny_model_dir), "int4", settings.models_dir, dense=True)
    assert cache_file is not None and packed_cache_file("org/hub-id", "int4", settings.models_dir) is None
    assert packed_cache_file(str(tiny_model_dir), "int4", settings.models_dir) != cache_file
    short = torch.tensor([[1, 42, 7, 99, 3]])  # decoding-sized: the packed kernel
    long = torch.arange(1, DENSE_MIN_ROWS + 5)[None]  # prompt-sized: the dense copy
    logits = []
    for _ in range(2):  # packs and saves, then reads the saved tensors back
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
        done = prepare(model, settings, device="cpu", quantize="int4", source=str(tiny_model_dir))
        assert done.quantized_linears == 15 and done.dense_prefill
        assert cache_file.is_file()
        with torch.inference_mode():
            logits.append((model(short).logits, model(long).logits))
    for first, second in zip(*logits, strict=True):
        torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert sum(name.endswith(".dense") for name in load_file(str(cache_file))) == 14  # all but the head
    cache_file.write_bytes(b"torn")  # a damaged cache is packed afresh, not fatal
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    prepare(model, settings, device="cpu", quantize="int4", source=str(tiny_model_dir))
    with torch.inference_mode():
        torch.testing.assert_close(model(short).logits, logits[0][0], rtol=0, atol=0)
        torch.testing.assert_close(model(long).logits, logits[0][1], rtol=0, atol=0)


def test_parameter_count_is_unchanged_by_packing(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from llm_module.runtime.quantize import parameter_count

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    before = sum(p.numel() for p in model.parameters())  # the head is tied: its weight is the embedding's
    assert model.config.tie_word_embeddings
    quantize_linears(model, "int4")
    assert parameter_count(model) == before  # not the packed head copy once more


def test_dense_prefill_copy_serves_long_inputs_and_the_packed_weight_short_ones():
    from llm_module.runtime.quantize import DENSE_MIN_ROWS

    linear = _linear()
    packed = WeightOnlyLinear(linear, "int4")
    both = WeightOnlyLinear(linear, "int4", packed=packed.packed_tensors, dense=True)
    short = torch.randn(DENSE_MIN_ROWS - 1, 128)
    torch.testing.assert_close(both(short), packed(short), rtol=0, atol=0)  # decoding: the int4 kernel
    long = torch.randn(DENSE_MIN_ROWS, 128)
    dense = long.to(COMPUTE_DTYPE) @ linear.weight.to(COMPUTE_DTYPE).t()
    torch.testing.assert_close(both(long), dense.float(), rtol=0, atol=0)  # prefill: the bf16 copy
    assert not torch.equal(both(long), packed(long))
    assert "dense_weight" not in both.state_dict()  # kept by the packed-weight cache, not the model's weights
