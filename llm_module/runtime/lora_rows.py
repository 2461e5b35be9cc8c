"""Each row of a batch runs with its own LoRA adapter (or none), in two batched matmuls per layer.

peft's mixed-batch path (``adapter_names=``) loops over the batch's adapters inside every LoRA
layer: per adapter an index list, a gather, two small matmuls, a scale and a scatter; with 8
adapters that is ~40 small ops per layer, and on a CPU those ops, not the arithmetic, set the
speed (bench/findings.md). Here each LoRA layer keeps, per row slot of the serving core, that
row's A as ``[slots, in, r]`` and B (already scaled) as ``[slots, r, out]`` (zeros for a
base-model row and for the ranks a smaller adapter lacks), filled when a row takes its slot. A
forward over a range of slots then costs two batched matmuls per layer whatever the mix; when every
row of the range uses one adapter it uses that adapter's own two matrices, and when none uses one
it adds nothing. The tables hold a copy of an adapter per slot (an r=16 adapter on every linear of
the default model: ~20 MB, so ~300 MB for 16 slots): they grow with the highest slot in use and
are freed when the serving core goes idle (``release_tables``).

``LoraRows.installed()`` is the one place the LoRA layers' forward is replaced (the base layer
plus that product), and it puts peft's own forward back on exit; peft still owns loading, naming
and unloading the weights. Models whose LoRA layers do something else (DoRA, biases, embedding
LoRA, modules_to_save) cannot be stacked: ``can_stack`` says so and the runner uses peft's
``adapter_names`` path for them (DoRA only over unpacked weights: ``adapter_files.unservable_reason``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


def lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def can_stack(model: nn.Module, adapters: Sequence[str]) -> bool:
    """True when every LoRA layer is a plain, unmerged linear LoRA for these adapters."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.utils import ModulesToSaveWrapper

    if any(isinstance(m, ModulesToSaveWrapper) for m in model.modules()):
        return False
    wanted = set(adapters) - {BASE}
    for layer in lora_layers(model):
        if type(layer) is not LoraLinear or layer.merged or "forward" in vars(layer):
            return False
        if any(name in getattr(layer, "lora_variant", {}) for name in wanted):
            return False
        if any(getattr(layer, "lora_bias", {}).get(name) for name in wanted):
            return False
    return True


class _Layer:
    """One LoRA layer's per-adapter matrices and per-slot tables."""

    __slots__ = ("module", "base", "_pairs", "a", "b")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.base = module.base_layer
        # Each adapter's (A, scaled B) in the shapes the products take, made on its first use: a
        # refresh after every load then costs nothing per loaded adapter (64 loaded with 8 in use
        # made every load transpose all 64: bench/findings.md).
        self._pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.a: torch.Tensor | None = None  # [slots, in, rank]
        self.b: torch.Tensor | None = None  # [slots, rank, out]

    def pair(self, adapter: str | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``adapter``'s (A as [in, r], B scaled as [r, out]) in this layer, or None if it has none here."""
        pair = self._pairs.get(adapter)  # the fast path: a decoding step asks once per layer
        if pair is not None or not adapter or adapter not in self.module.lora_A:
            return pair
        module = self.module
        pair = self._pairs[adapter] = (module.lora_A[adapter].weight.t().contiguous(),
                                       (module.lora_B[adapter].weight.t() * module.scaling[adapter]).contiguous())
        return pair

    def grow(self, slots: int) -> None:
        """Tables for ``slots`` slots (the first ones keep their contents)."""
        names = list(self.module.lora_A)
        if not names:  # a LoRA layer none of the loaded adapters uses (peft keeps it after an unload)
            return
        rank = max(self.module.lora_A[n].weight.shape[0] for n in names)
        weight_a, weight_b = self.module.lora_A[names[0]].weight, self.module.lora_B[names[0]].weight
        a = weight_a.new_zeros(slots, weight_a.shape[1], rank)
        b = weight_b.new_zeros(slots, rank, weight_b.shape[0])
        if self.a is not None:
            a[: len(self.a)] = self.a
            b[: len(self.b)] = self.b
        self.a, self.b = a, b

    def fill(self, slot: int, adapter: str | None) -> None:
        if self.a is None:
            return
        self.a[slot].zero_()
        self.b[slot].zero_()
        pair = self.pair(adapter)
        if pair is not None:
            a, b = pair
            self.a[slot, :, : a.shape[1]] = a
            self.b[slot, : b.shape[0]] = b


class LoraRows:
    """The adapters of the serving core's row slots, for one set of loaded adapters."""

    def __init__(self, model: nn.Module, slots: int) -> None:
        self.slots = slots
        self.layers = [_Layer(m) for m in lora_layers(model)]
        self.slot_adapter: list[str | None] = [None] * slots
        self._capacity = 0  # slots the tables hold: made on the first mixed range, grown by need
        self._slots: slice | torch.Tensor = slice(0, 0)
        self._uniform: str | None = None
        self._mixed = False

    # ------------------------------------------------------------------ slots
    def assign(self, slot: int, adapter: str | None) -> None:
        self.slot_adapter[slot] = adapter
        if slot < self._capacity:
            for layer in self.layers:
                layer.fill(slot, adapter)

    def move(self, src: int, dst: int) -> None:
        self.assign(dst, self.slot_adapter[src])

    def swap(self, a: int, b: int) -> None:
        first, second = self.slot_adapter[a], self.slot_adapter[b]
        self.assign(a, second)
        self.assign(b, first)

    def select(self, slots: slice | torch.Tensor) -> None:
        """The next forward covers ``slots``: a range, or slot indices (rows gathered from anywhere)."""
        indices = range(self.slots)[slots] if isinstance(slots, slice) else slots.tolist()
        names = {self.slot_adapter[i] for i in indices}
        self._slots = slots
        self._mixed = len(names) > 1
        self._uniform = next(iter(names)) if len(names) == 1 else None
        if self._mixed and max(indices) >= self._capacity:
            self._grow_tables(max(indices) + 1)

    def _grow_tables(self, needed: int) -> None:
        capacity = min(self.slots, max(needed, 2 * self._capacity))
        for layer in self.layers:
            layer.grow(capacity)
            for slot in range(self._capacity, capacity):
                if self.slot_adapter[slot]:
                    layer.fill(slot, self.slot_adapter[slot])
        self._capacity = capacity

    def release_tables(self) -> None:
        """Free the per-slot tables (the serving core went idle; the next mixed range makes them again)."""
        for layer in self.layers:
            layer.a = layer.b = None
        self._capacity = 0

    # ------------------------------------------------------------------ the forward
    @contextlib.contextmanager
    def installed(self) -> Iterator[LoraRows]:
        """Within the block every LoRA layer's forward is its base layer plus the selected rows' deltas."""
        replaced = []
        try:
            for layer in self.layers:
                layer.module.forward = self._forward_for(layer)
                replaced.append(layer.module)
            yield self
        finally:
            for module in replaced:
                del module.forward

    def _forward_for(self, layer: _Layer):
        base = layer.base

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            output = base(x, *args, **kwargs)
            if self._mixed and layer.a is not None:
                a, b = layer.a[self._slots], layer.b[self._slots]
                rows = x.to(a.dtype).reshape(x.shape[0], -1, x.shape[-1])
                delta = torch.bmm(torch.bmm(rows, a), b).view(*x.shape[:-1], b.shape[-1])
            elif (pair := layer.pair(self._uniform)) is not None:
                a, b = pair
                delta = (x.to(a.dtype) @ a) @ b
            else:
                return output
            return output + delta.to(output.dtype)

        return forward


@contextlib.contextmanager
def one_adapter(model: nn.Module, adapter: str | None) -> Iterator[None]:
    """Every row of the forwards inside the block uses ``adapter`` (None: the base model).

    For paths that run a batch outside the serving core's slots (beam search, scoring): the same
    stacked forward, with every row the same.
    """
    rows = LoraRows(model, slots=1)
    rows.assign(0, adapter)
    rows.select(slice(0, 1))
    with rows.installed():
        yield
