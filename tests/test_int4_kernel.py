"""llm_module's own matmuls: the exact product of the int8-quantized input (one or two parts) and
the 4-bit grid (the model's layers) or the int8 grid (the output head), any row count, for each
build this CPU can run (AVX-512 VNNI, AVX2); and how the built kernel is found (never compiled at
run time)."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from torch import nn

from llm_module.runtime import int4_kernel
from llm_module.runtime.quantize import OWN_INT8, WeightOnlyLinear, _int4_grid, _int8_grid, _quantize_int8

has_vnni = int4_kernel._cpu_has(int4_kernel.CPU_FLAGS)
needs_vnni = pytest.mark.skipif(not has_vnni, reason="no AVX-512 VNNI CPU here: torch's kernels are used")


@pytest.fixture(scope="module")
def kernel():
    """The build kernel() picked: the packed layers' tests run on it."""
    if not any(int4_kernel._cpu_has(flags) for _, flags, _ in int4_kernel.BUILDS):
        pytest.skip("no AVX-512 VNNI or AVX2 CPU here: torch's kernels are used")
    module = int4_kernel.kernel()
    assert module is not None, ("this CPU runs one of llm_module's kernels, so it must be built in this "
                                "install: pip install --no-build-isolation -e . with a C++ compiler")
    return module


@pytest.fixture(scope="module", params=[isa for _, _, isa in int4_kernel.BUILDS])
def build(request):
    """Each build this CPU can run, whichever kernel() picked: the matmuls are tested on all."""
    name, flags, isa = next(b for b in int4_kernel.BUILDS if b[2] == request.param)
    if not int4_kernel._cpu_has(flags):
        pytest.skip(f"this CPU lacks {isa}")
    module = importlib.import_module(name)
    assert module.VERSION == int4_kernel.KERNEL_VERSION and module.ISA == isa
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
def test_matches_the_exact_product(build, out_features, in_features, rows, parts):
    generator = torch.Generator().manual_seed(out_features + rows)
    weight = torch.randn(out_features, in_features, generator=generator)
    codes, scales, mins = _int4_grid(weight, 32)
    x = torch.randn(rows, in_features, generator=generator) * 3
    x[0, :32] = 0  # an all-zero group has no step
    got = build.int4_mm(x, *int4_kernel.pack(codes, scales, mins), parts)
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

    from llm_module.runtime.quantize import quantize_linears

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    quantize_linears(model, "int4")
    layer = model.model.layers[0]
    attention, mlp = layer.self_attn, layer.mlp
    assert mlp.down_proj.input_parts == attention.q_proj.input_parts == attention.v_proj.input_parts == 2
    assert mlp.up_proj.input_parts == mlp.gate_proj.input_parts == attention.o_proj.input_parts == 1


def test_bad_input_is_an_error_not_a_crash(build):
    codes, scales, mins = _int4_grid(torch.randn(16, 32), 32)
    packed = int4_kernel.pack(codes, scales, mins)
    with pytest.raises(RuntimeError, match="float32"):
        build.int4_mm(torch.randn(2, 32, dtype=torch.bfloat16), *packed, 1)
    with pytest.raises(RuntimeError, match="layout"):
        build.int4_mm(torch.randn(2, 64), *packed, 1)
    with pytest.raises(RuntimeError, match="parts"):
        build.int4_mm(torch.randn(2, 32), *packed, 3)


def _exact_int8(x: torch.Tensor, codes, scales, parts: int = 1) -> torch.Tensor:
    """float64 product of the input as the kernel quantizes it and the int8 grid (float16 scales)."""
    n, k = codes.shape
    weight = codes.double().view(n, k // 32, 32) * scales.to(torch.float16).double()[..., None]
    return _as_the_kernel_reads(x, parts) @ weight.view(n, k).t()


@pytest.mark.parametrize(("out_features", "in_features"), [(16, 32), (48, 64), (200, 576), (13, 96)])
@pytest.mark.parametrize("rows", list(range(1, 18)))
@pytest.mark.parametrize("parts", [1, 2])
def test_int8_matches_the_exact_product(build, out_features, in_features, rows, parts):
    """Any output count (200 and 13 leave a part-filled last block of 16), 1 to 17 rows (two
    passes of 8 and one more), an all-zero input group and an all-zero weight group."""
    generator = torch.Generator().manual_seed(out_features + rows)
    weight = torch.randn(out_features, in_features, generator=generator)
    weight[-1, 32:64] = 0 if in_features >= 64 else weight[-1, 32:64]  # a weight group with no scale
    codes, scales = _int8_grid(weight)
    x = torch.randn(rows, in_features, generator=generator) * 3
    x[0, :32] = 0  # an all-zero group has no step
    got = build.int8_mm(x, *int4_kernel.pack_int8(codes, scales), out_features, parts)
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    expected = _exact_int8(x, codes, scales, parts)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_int8_grid_reproduces_a_q8_0_block_exactly():
    """A GGUF Q8_0 block: ``w = q * d`` with ``d`` float16 and its largest code ±127."""
    generator = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (32, 8, 32), generator=generator)
    q[..., 5] = torch.where(torch.rand(32, 8, generator=generator) < 0.5, 127, -127)
    d = (torch.rand(32, 8, 1, generator=generator) * 0.01 + 1e-4).to(torch.float16)
    weight = (q * d.float()).reshape(32, 256)
    codes, scales = _int8_grid(weight)
    assert torch.equal(codes.view(32, 8, 32).long(), q) and torch.equal(scales, d[..., 0])


def test_int8_is_as_close_to_the_float_product_as_its_input_rounding_allows(kernel):
    """Per group of 32 inputs, one int8 part moves the product by ~0.3 % of its size, two by ~1e-5
    (torch's int8 kernel rounds its bf16 output alone by up to 0.4 %)."""
    weight = torch.randn(256, 576, generator=torch.Generator().manual_seed(0)) * 0.05
    codes, scales = _int8_grid(weight)
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(1)) * 3
    packed = int4_kernel.pack_int8(codes, scales)
    full = _exact_int8(x, codes, scales, parts=0)

    def error(parts: int) -> float:
        return float((int4_kernel.matmul_int8(x, *packed, 256, parts).double() - full).norm() / full.norm())

    assert error(2) < 1e-4 < error(1) < 1e-2


def test_packed_head_uses_it_and_rebuilds_from_its_tensors(kernel):
    linear = nn.Linear(64, 40, bias=True)  # 40 outputs: a part-filled last block
    x = torch.randn(2, 5, 64)
    layer = WeightOnlyLinear(linear, "int8")
    assert layer.kernel == OWN_INT8 and layer.packed_tensors[0].shape == (3, 2, 8, 64)
    codes, scales = _int8_grid(linear.weight.detach())
    expected = _exact_int8(x.reshape(-1, 64), codes, scales).view(2, 5, 40) + linear.bias.double()
    with torch.inference_mode():
        out = layer(x)
        assert out.dtype == torch.float32 and out.shape == (2, 5, 40)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        again = WeightOnlyLinear(linear, "int8", packed=layer.packed_tensors)
        assert torch.equal(again(x), out)
        # Saved in torch's layout (an old cache): packed again for ours.
        repacked = WeightOnlyLinear(linear, "int8", packed=_quantize_int8(linear.weight.detach().float()))
        assert repacked.kernel == OWN_INT8 and torch.equal(repacked(x), out)
        # And ours turned off: torch's layout and kernel.
        theirs = WeightOnlyLinear(linear, "int8", packed=layer.packed_tensors, own_kernel=False)
        assert theirs.kernel != OWN_INT8 and theirs.weight.dtype == torch.int8 and theirs.weight.dim() == 2


def test_the_output_head_of_a_packed_model_gives_float32_logits(tiny_model_dir, kernel):
    from transformers import AutoModelForCausalLM

    from llm_module.runtime.quantize import quantize_linears

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    quantize_linears(model, "int4")
    head = model.get_output_embeddings()
    assert head.kernel == OWN_INT8 and head.input_parts == 2  # near-exact input: see HEAD_INPUT_PARTS
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 42, 7, 99, 3]])).logits
    assert logits.dtype == torch.float32
    assert not torch.equal(logits, logits.to(torch.bfloat16).float())  # not rounded to bf16 anywhere


def test_int8_bad_input_is_an_error_not_a_crash(build):
    kernel = build
    packed = int4_kernel.pack_int8(*_int8_grid(torch.randn(20, 32)))
    with pytest.raises(RuntimeError, match="float32"):
        kernel.int8_mm(torch.randn(2, 32, dtype=torch.bfloat16), *packed, 20, 1)
    with pytest.raises(RuntimeError, match="float32"):
        kernel.int8_mm(torch.randn(32, 2).t(), *packed, 20, 1)  # not contiguous
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernel.int8_mm(torch.randn(2, 40), *packed, 20, 1)
    with pytest.raises(RuntimeError, match="layout"):
        kernel.int8_mm(torch.randn(2, 64), *packed, 20, 1)
    with pytest.raises(RuntimeError, match="out_features"):
        kernel.int8_mm(torch.randn(2, 32), *packed, 33, 1)
    with pytest.raises(RuntimeError, match="out_features"):
        kernel.int8_mm(torch.randn(2, 32), *packed, 16, 1)
    with pytest.raises(RuntimeError, match="parts"):
        kernel.int8_mm(torch.randn(2, 32), *packed, 20, 3)
    with pytest.raises(RuntimeError, match="scales"):
        kernel.int8_mm(torch.randn(2, 32), packed[0], packed[1].float(), 20, 1)
    with pytest.raises(RuntimeError, match="layout"):  # an int4 weight handed to the int8 matmul
        kernel.int8_mm(torch.randn(2, 32), *int4_kernel.pack(*_int4_grid(torch.randn(32, 32), 32))[:2], 32, 1)


@pytest.fixture
def fresh_load(monkeypatch):
    """kernel() as at a first call in a fresh process; the loaded module comes back afterwards."""
    monkeypatch.setattr(int4_kernel, "_loaded", {})
    monkeypatch.setattr(int4_kernel, "_why_not", [])
    return monkeypatch


def test_a_cpu_without_the_flags_never_imports_the_library(fresh_load, caplog):
    imported = []
    fresh_load.setattr(int4_kernel, "_cpu_has", lambda flags: False)
    fresh_load.setattr(importlib, "import_module", lambda name, *a: imported.append(name))
    with caplog.at_level(logging.INFO, logger=int4_kernel.__name__):
        assert int4_kernel.kernel() is None
    assert imported == []
    assert int4_kernel.describe() == "torch (this CPU lacks AVX-512 VNNI and AVX2)"
    assert "packed layers use torch's kernels" in caplog.text


def test_only_the_builds_whose_flags_the_cpu_has_are_imported(fresh_load, caplog):
    """An AVX2-only CPU: the AVX-512 library is never loaded (it could hold AVX-512 code anywhere)."""
    imported = []
    avx2 = int4_kernel.BUILDS[1]
    fresh_load.setattr(int4_kernel, "_cpu_has", lambda flags: flags == avx2[1])
    real_import = importlib.import_module
    fresh_load.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real_import(name))
    with caplog.at_level(logging.INFO, logger=int4_kernel.__name__):
        module = int4_kernel.kernel()
    assert imported == [avx2[0]]
    if module is not None:  # built here
        assert int4_kernel.describe() == "llm_module int4 (AVX2)" and "(AVX2) loaded from" in caplog.text


def test_an_install_without_the_built_kernel_uses_torch_and_says_so(fresh_load, caplog):
    fresh_load.setattr(int4_kernel, "_cpu_has", lambda flags: True)
    fresh_load.setattr(int4_kernel, "BUILDS", tuple((f"llm_module.runtime._no_{isa[:4]}", flags, isa)
                                                    for _, flags, isa in int4_kernel.BUILDS))
    with caplog.at_level(logging.WARNING, logger=int4_kernel.__name__):
        assert int4_kernel.kernel() is None
    assert int4_kernel.describe() == "torch (llm_module's AVX-512 VNNI kernel is not built in this install)"
    assert "--no-build-isolation" in caplog.text and "packed layers use torch's kernels" in caplog.text
    layer = WeightOnlyLinear(nn.Linear(64, 48), "int8")
    assert layer.kernel == "torch int8" and layer(torch.randn(3, 64)).shape == (3, 48)


@needs_vnni
def test_a_kernel_built_from_other_sources_is_not_used(fresh_load, caplog):
    fresh_load.setattr(int4_kernel, "KERNEL_VERSION", int4_kernel.KERNEL_VERSION + 1)
    with caplog.at_level(logging.WARNING, logger=int4_kernel.__name__):
        assert int4_kernel.kernel() is None
    assert "rebuild" in caplog.text and int4_kernel.describe().startswith("torch (")


def test_nothing_is_compiled_at_run_time():
    """The kernels are built by setup.py at install time; the run-time module only imports them."""
    source = open(int4_kernel.__file__, encoding="utf-8").read()
    assert "cpp_extension" not in source and "import_module(name)" in source


# ----------------------------------------------------------------------------------- worker threads
@pytest.fixture()
def pool_threads(build):
    """This thread's matmuls on the build's own workers, their count set by the test; then as before."""
    before = build.threads()
    build.set_own_workers(True)
    yield build.set_threads
    build.set_own_workers(False)
    build.set_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_the_product_is_the_same_however_many_workers_split_it(build, pool_threads, threads):
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(80, 96, generator=generator)  # 5 blocks of 16 columns: parts of unequal size
    x = torch.randn(9, 96, generator=generator)
    codes, scales, mins = _int4_grid(weight, 32)
    int8_packed = int4_kernel.pack_int8(*_int8_grid(weight))
    pool_threads(threads)
    got4 = build.int4_mm(x, *int4_kernel.pack(codes, scales, mins), 1)
    got8 = build.int8_mm(x, *int8_packed, 80, 1)
    pool_threads(1)
    assert torch.equal(got4, build.int4_mm(x, *int4_kernel.pack(codes, scales, mins), 1))
    assert torch.equal(got8, build.int8_mm(x, *int8_packed, 80, 1))
    expected = _exact(x, codes, scales, mins)
    torch.testing.assert_close(got4.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_callers_in_several_threads_at_once_each_get_their_own_product(build, pool_threads):
    """One caller uses the workers; a second one arriving meanwhile computes alone: both right."""
    import threading

    pool_threads(2)
    generator = torch.Generator().manual_seed(11)
    weight = torch.randn(256, 128, generator=generator)
    packed = int4_kernel.pack(*_int4_grid(weight, 32))
    inputs = [torch.randn(3, 128, generator=generator) for _ in range(4)]
    expected = [build.int4_mm(x, *packed, 1) for x in inputs]
    wrong: list[int] = []

    def caller(index: int) -> None:
        build.set_own_workers(True)  # a per-thread choice
        for _ in range(300):
            if not torch.equal(build.int4_mm(inputs[index], *packed, 1), expected[index]):
                wrong.append(index)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a caller hung: the workers lost a job"
    assert not wrong
