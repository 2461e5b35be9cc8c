"""One forward for a batch whose rows use different LoRA adapters (or none).

peft's mixed-batch path (``adapter_names=``) loops over the batch's adapters inside every LoRA
layer: per adapter an index list, a gather, two small matmuls, a scale and a scatter. With 8
adapters that is ~40 small ops per layer, ~8,000 per decoded token on a 30-block model, and on a
CPU those ops, not the arithmetic, set the speed.

Here the adapters a batch uses are concatenated once per call, per layer: A as ``[in, R]`` and B,
already scaled, as ``[R, out]``, R being the sum of their ranks. A row mask ``[rows, R]`` keeps
each row to its own adapter's columns (all zeros for a base-model row). Every layer then costs
two matmuls and one multiply, whatever the mix; a batch with one adapter skips the multiply.
The LoRA layers are switched off for the call and a forward hook adds the stacked product, so
peft still owns loading, naming and unloading the weights.
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

    DoRA and other variants, LoRA biases, embedding or conv LoRA and modules_to_save change
    the computation: such models take peft's own mixed-batch path.
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.utils import ModulesToSaveWrapper

    if any(isinstance(m, ModulesToSaveWrapper) for m in model.modules()):
        return False
    wanted = set(adapters) - {BASE}
    for layer in _lora_layers(model):
        if type(layer) is not LoraLinear or layer.merged or not hasattr(layer, "_disable_adapters"):
            return False
        if any(name in getattr(layer, "lora_variant", {}) for name in wanted):
            return False
        if any(getattr(layer, "lora_bias", {}).get(name) for name in wanted):
            return False
    return True


class _StackedLayer:
    """The stacked A/B weights of one LoRA layer for one batch, applied by a forward hook."""

    def __init__(self, layer: nn.Module, row_adapters: Sequence[str]) -> None:
        names = [n for n in dict.fromkeys(row_adapters) if n != BASE and n in layer.lora_A]
        a_parts, b_parts, spans, start = [], [], {}, 0
        for name in names:
            a = layer.lora_A[name].weight  # [r, in]
            b = layer.lora_B[name].weight  # [out, r]
            a_parts.append(a.t())
            b_parts.append(b.t() * layer.scaling[name])
            spans[name] = (start, start + a.shape[0])
            start += a.shape[0]
        self.active = bool(names)
        if not self.active:
            return
        self.a = torch.cat(a_parts, dim=1).contiguous()  # [in, R]
        self.b = torch.cat(b_parts, dim=0).contiguous()  # [R, out]
        # One adapter on every row needs no mask; otherwise each row keeps its own span.
        self.mask = None
        if len(names) > 1 or len(set(row_adapters)) > 1:
            mask = torch.zeros(len(row_adapters), start, dtype=self.a.dtype, device=self.a.device)
            for row, name in enumerate(row_adapters):
                if name in spans:
                    mask[row, slice(*spans[name])] = 1
            self.mask = mask

    def _row_mask(self, rows: int) -> torch.Tensor:
        known = self.mask.shape[0]
        if rows != known:  # beam search repeats each row num_beams times, consecutively
            if rows % known:
                raise RuntimeError(f"a batch of {rows} rows does not match {known} adapter names")
            self.mask = self.mask.repeat_interleave(rows // known, dim=0)
        return self.mask

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0].to(self.a.dtype)
        hidden = x @ self.a
        if self.mask is not None:
            mask = self._row_mask(x.shape[0])
            hidden = hidden * mask.view(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1])
        return output + (hidden @ self.b).to(output.dtype)


@contextlib.contextmanager
def stacked_adapters(model: nn.Module, row_adapters: Sequence[str]) -> Iterator[None]:
    """Within the block, row ``i`` of every forward uses adapter ``row_adapters[i]`` (BASE: none).

    The caller must hold the model exclusively (the engine's model lock): the LoRA layers are
    switched off and hooked for the duration, then restored.
    """
    hooks, switched = [], []
    try:
        for layer in _lora_layers(model):
            switched.append((layer, layer._disable_adapters))
            layer._disable_adapters = True
            stacked = _StackedLayer(layer, row_adapters)
            if stacked.active:
                hooks.append(layer.register_forward_hook(stacked))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for layer, was_disabled in switched:
            layer._disable_adapters = was_disabled


def adapter_rows(model: nn.Module, row_adapters: Sequence[str]) -> tuple[contextlib.AbstractContextManager, dict]:
    """How to run a batch with these per-row adapters: (context, extra generate kwargs).

    The stacked path when the model allows it, else peft's ``adapter_names=`` argument.
    """
    if can_stack(model, row_adapters):
        return stacked_adapters(model, row_adapters), {}
    return contextlib.nullcontext(), {"adapter_names": list(row_adapters)}
