"""llm_module's own int4 matmul: the exact product of the bf16 input and the 4-bit grid, any row count."""

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
    reason="no AVX-512 BF16 CPU or no C++ compiler here: torch's int4 kernel is used")


@pytest.fixture(scope="module")
def kernel():
    module = int4_kernel.kernel()
    assert module is not None, "the CPU has AVX-512 BF16, so the kernel must build"
    return module


def _exact(x: torch.Tensor, codes, scales, mins) -> torch.Tensor:
    """float64 product of the bf16-rounded input and the grid (scales and minimums kept in float16)."""
    n, k = codes.shape
    scales, mins = (t.to(torch.float16).double()[..., None] for t in (scales, mins))
    weight = codes.double().view(n, k // 32, 32) * scales + mins
    return x.to(torch.bfloat16).double() @ weight.view(n, k).t()


@pytest.mark.parametrize(("out_features", "in_features"), [(16, 32), (48, 64), (192, 576)])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17])
def test_matches_the_exact_product(kernel, out_features, in_features, rows):
    generator = torch.Generator().manual_seed(out_features + rows)
    weight = torch.randn(out_features, in_features, generator=generator)
    codes, scales, mins = _int4_grid(weight, 32)
    x = torch.randn(rows, in_features, generator=generator) * 3
    got = int4_kernel.matmul(x, *int4_kernel.pack(codes, scales, mins))
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    expected = _exact(x, codes, scales, mins)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4 * expected.abs().max().item())


def test_packed_linear_uses_it_and_rebuilds_from_its_tensors(kernel):
    linear = nn.Linear(64, 48, bias=True)
    layer = WeightOnlyLinear(linear, "int4")
    assert layer.mins is not None  # the kernel's layout
    x = torch.randn(2, 5, 64)
    codes, scales, mins = _int4_grid(linear.weight.detach(), 32)
    expected = _exact(x.reshape(-1, 64), codes, scales, mins).view(2, 5, 48) + linear.bias.double()
    with torch.inference_mode():
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-4)
        again = WeightOnlyLinear(linear, "int4", packed=layer.packed_tensors)
        assert torch.equal(again(x), layer(x))


def test_bad_input_is_an_error_not_a_crash(kernel):
    codes, scales, mins = _int4_grid(torch.randn(16, 32), 32)
    packed = int4_kernel.pack(codes, scales, mins)
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernel.int4_mm(torch.randn(2, 32), *packed)
    with pytest.raises(RuntimeError, match="layout"):
        kernel.int4_mm(torch.randn(2, 64, dtype=torch.bfloat16), *packed)


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
