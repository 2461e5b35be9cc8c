"""One forward for a batch whose rows use different LoRA adapters (or none).

peft's mixed-batch path (``adapter_names=``) loops over the batch's adapters inside every LoRA
layer: per adapter an index list, a gather, two small matmuls, a scale and a scatter. With 8
adapters that is ~40 small ops per layer, ~8,000 per decoded token on a 30-block model, and on a
CPU those ops, not the arithmetic, set the speed.

Here each LoRA layer's weights for the batch are laid out once per call, row by row: A as
``[rows, in, r]`` and B, already scaled, as ``[rows, r, out]`` (zeros for a base-model row, and
for the ranks a smaller adapter lacks). Every layer then costs two batched matmuls, whatever the
mix; a batch with one adapter on every row uses two plain matmuls. For the call the LoRA layers'
forward is the base layer plus that product: peft's own forward, with its checks and its loop,
is bypassed, while peft still owns loading, naming and unloading the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .adapters import BASE  # peft's name for "no adapter" in a mixed batch


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def can_stack(model: nn.Module, adapters: Sequence[str]) -> bool:
    """True when every LoRA layer is a plain, unmerged linear LoRA for these adapters.

    DoRA and other variants, LoRA biases, embedding or conv LoRA, modules_to_save and a forward
    already replaced by someone else (accelerate's offloading hooks) change the computation:
    such models take peft's own mixed-batch path.
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.utils import ModulesToSaveWrapper

    if any(isinstance(m, ModulesToSaveWrapper) for m in model.modules()):
        return False
    wanted = set(adapters) - {BASE}
    for layer in _lora_layers(model):
        if type(layer) is not LoraLinear or layer.merged or "forward" in vars(layer):
            return False
        if any(name in getattr(layer, "lora_variant", {}) for name in wanted):
            return False
        if any(getattr(layer, "lora_bias", {}).get(name) for name in wanted):
            return False
    return True


class _StackedForward:
    """One LoRA layer's forward for one batch: its base layer plus each row's own adapter."""

    def __init__(self, layer: nn.Module, row_adapters: Sequence[str]) -> None:
        self.base = layer.base_layer
        self.a = self.b = None
        names = [n for n in dict.fromkeys(row_adapters) if n != BASE and n in layer.lora_A]
        if not names:
            return
        pairs = {n: (layer.lora_A[n].weight.t(), layer.lora_B[n].weight.t() * layer.scaling[n]) for n in names}
        if len(set(row_adapters)) == 1:  # one adapter on every row: two plain matmuls
            self.a, self.b = (t.contiguous() for t in pairs[names[0]])
            return
        # Per row, zero-padded to the largest rank: zero columns add exact zeros.
        a_any, b_any = pairs[names[0]]
        rank = max(a.shape[1] for a, _ in pairs.values())
        self.a = a_any.new_zeros(len(row_adapters), a_any.shape[0], rank)
        self.b = b_any.new_zeros(len(row_adapters), rank, b_any.shape[1])
        for row, name in enumerate(row_adapters):
            if name in pairs:
                a, b = pairs[name]
                self.a[row, :, :a.shape[1]] = a
                self.b[row, :b.shape[0]] = b

    def _per_row(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        known = self.a.shape[0]
        if rows != known:  # beam search repeats each row num_beams times, consecutively
            if rows % known:
                raise RuntimeError(f"a batch of {rows} rows does not match {known} adapter names")
            self.a = self.a.repeat_interleave(rows // known, dim=0)
            self.b = self.b.repeat_interleave(rows // known, dim=0)
        return self.a, self.b

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        output = self.base(x, *args, **kwargs)
        if self.a is None:
            return output
        x = x.to(self.a.dtype)
        if self.a.dim() == 2:
            delta = (x @ self.a) @ self.b
        else:
            a, b = self._per_row(x.shape[0])
            rows = x.reshape(x.shape[0], -1, x.shape[-1])  # [rows, tokens, in]
            delta = torch.bmm(torch.bmm(rows, a), b).view(*x.shape[:-1], b.shape[-1])
        return output + delta.to(output.dtype)


@contextlib.contextmanager
def stacked_adapters(model: nn.Module, row_adapters: Sequence[str]) -> Iterator[None]:
    """Within the block, row ``i`` of every forward uses adapter ``row_adapters[i]`` (BASE: none).

    The caller must hold the model exclusively (the engine's model lock): every LoRA layer's
    forward is replaced for the duration (an instance attribute, which ``nn.Module.__call__``
    reads), then restored.
    """
    replaced = []
    try:
        for layer in _lora_layers(model):
            layer.forward = _StackedForward(layer, row_adapters)
            replaced.append(layer)
        yield
    finally:
        for layer in replaced:
            del layer.forward


def adapter_rows(model: nn.Module, row_adapters: Sequence[str]) -> tuple[contextlib.AbstractContextManager, dict]:
    """How to run a batch with these per-row adapters: (context, extra generate kwargs).

    The stacked path when the model allows it, else peft's ``adapter_names=`` argument.
    """
    if can_stack(model, row_adapters):
        return stacked_adapters(model, row_adapters), {}
    return contextlib.nullcontext(), {"adapter_names": list(row_adapters)}
