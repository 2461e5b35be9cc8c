"""llm_module's own int4 matmul: the exact product of the int8-quantized input (one or two parts)
and the 4-bit grid, any row count."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch
from torch import nn

from llm_module import int4_kernel
from llm_module.speed import WeightOnlyLinear, _int4_grid

pytestmark = pytest.mark.skipif(
    not int4_kernel._cpu_has(int4_kernel.CPU_FLAGS) or shutil.which("c++") is None,
    reason="no AVX-512 VNNI CPU or no C++ compiler here: torch's int4 kernel is used")


@pytest.fixture(scope="module")
def kernel():
    module = int4_kernel.kernel()
    assert module is not None, "the CPU has AVX-512 VNNI, so the kernel must build"
    return module


def _as_the_kernel_reads(x: torch.Tensor, parts: int) -> torch.Tensor:
    """float64 values of ``x``'s int8 codes, per group of 32: ``q = round(x * 127 / amax)``, and with
    two parts also ``round((x * 127 / amax - q) * 256)`` at a 256th of the step (all in float32)."""
    if parts == 0:  # no quantization: the float32 input itself
        return x.float().double()
    groups = x.float().reshape(x.shape[0], -1, 32)
    amax = groups.abs().amax(dim=-1, keepdim=True)
    scaled = groups * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    codes = scaled.round()
    step = (amax / 127).double()
    if parts == 2:
        codes = codes * 256 + ((scaled - codes) * 256).round().clamp(-127, 127)
        step = step / 256
    return (codes.double() * step).reshape(x.shape)


def _exact(x: torch.Tensor, codes, scales, mins, parts: int = 1) -> torch.Tensor:
    """float64 product of the input as the kernel quantizes it and the grid (scales and minimums in float16)."""
    n, k = codes.shape
    scales, mins = (t.to(torch.float16).double()[..., None] for t in (scales, mins))
    weight = codes.double().view(n, k // 32, 32) * scales + mins
    return _as_the_kernel_reads(x, parts) @ weight.view(n, k).t()


@pytest.mark.parametrize(("out_features", "in_features"), [(16, 32), (48, 64), (192, 576)])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17])
@pytest.mark.parametrize("parts", [1, 2])
def test_matches_the_exact_product(kernel, out_features, in_features, rows, parts):
    generator = torch.Generator().manual_seed(out_features + rows)
    weight = torch.randn(out_features, in_features, generator=generator)
    codes, scales, mins = _int4_grid(weight, 32)
    x = torch.randn(rows, in_features, generator=generator) * 3
    x[0, :32] = 0  # an all-zero group has no step
    got = int4_kernel.matmul(x, *int4_kernel.pack(codes, scales, mins), parts)
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    expected = _exact(x, codes, scales, mins, parts)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_two_parts_read_the_input_almost_exactly(kernel):
    """One int8 part rounds each value by up to half a step (amax / 254); the second part brings
    the product to within ~1e-5 of the float32 input's."""
    weight = torch.randn(64, 576, generator=torch.Generator().manual_seed(0))
    codes, scales, mins = _int4_grid(weight, 32)
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(1)) ** 3  # heavy tails
    packed = int4_kernel.pack(codes, scales, mins)
    full = _exact(x, codes, scales, mins, parts=0)  # no rounding of x at all

    def error(parts: int) -> float:
        return float((int4_kernel.matmul(x, *packed, parts).double() - full).norm() / full.norm())

    assert error(2) < 1e-4 < error(1) < 5e-2


def test_packed_linear_uses_it_and_rebuilds_from_its_tensors(kernel):
    linear = nn.Linear(64, 48, bias=True)
    x = torch.randn(2, 5, 64)
    codes, scales, mins = _int4_grid(linear.weight.detach(), 32)
    for fine_input, parts in ((False, 1), (True, 2)):
        layer = WeightOnlyLinear(linear, "int4", fine_input=fine_input)
        assert layer.mins is not None  # the kernel's layout
        expected = _exact(x.reshape(-1, 64), codes, scales, mins, parts).view(2, 5, 48) + linear.bias.double()
        with torch.inference_mode():
            torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
            again = WeightOnlyLinear(linear, "int4", packed=layer.packed_tensors, fine_input=fine_input)
            assert torch.equal(again(x), layer(x))


def test_q_k_v_and_the_mlp_output_projection_read_their_input_in_two_parts(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from llm_module.speed import quantize_linears

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    quantize_linears(model, "int4")
    layer = model.model.layers[0]
    attention, mlp = layer.self_attn, layer.mlp
    assert mlp.down_proj.input_parts == attention.q_proj.input_parts == attention.v_proj.input_parts == 2
    assert mlp.up_proj.input_parts == mlp.gate_proj.input_parts == attention.o_proj.input_parts == 1


def test_bad_input_is_an_error_not_a_crash(kernel):
    codes, scales, mins = _int4_grid(torch.randn(16, 32), 32)
    packed = int4_kernel.pack(codes, scales, mins)
    with pytest.raises(RuntimeError, match="float32"):
        kernel.int4_mm(torch.randn(2, 32, dtype=torch.bfloat16), *packed, 1)
    with pytest.raises(RuntimeError, match="layout"):
        kernel.int4_mm(torch.randn(2, 64), *packed, 1)
    with pytest.raises(RuntimeError, match="parts"):
        kernel.int4_mm(torch.randn(2, 32), *packed, 3)


def test_a_stale_build_lock_is_removed_and_a_live_one_kept(tmp_path):
    stale, live = tmp_path / "stale", tmp_path / "live"
    stale.touch()
    live.touch()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    int4_kernel._clear_stale_lock(stale)
    int4_kernel._clear_stale_lock(live)
    int4_kernel._clear_stale_lock(tmp_path / "absent")
    assert not stale.exists() and live.exists()
