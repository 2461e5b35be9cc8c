"""The keys and values of every running row, one slot per row, in tensors allocated once.

Each layer keeps keys and values as ``[slots, kv_heads, capacity + 1, head_dim]``. A row owns one
slot for its whole life and its tokens sit at their own positions (0, 1, 2, ...) in it, so rows
of any lengths share a forward pass without padding each other's caches: a forward covers a
range of slots (the rows being decoded: the scheduler keeps them in slots ``0:n``), writes its new
keys and values at each row's positions and attends over the first ``kv_len`` positions of those
slots, a view, not a copy; a forward over scattered slots (prompts being prefilled) gathers them. A boolean mask built
from the rows' positions keeps every query to its own row's past. The extra last position is a
bin for the keys of padding columns (left-padded prompt chunks), never attended to.

It is a transformers ``Cache``, so the model's own attention code calls ``update`` as it would
on a DynamicCache; the scheduler moves rows between slots (``move``/``swap``) to keep the rows
it decodes in one range.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

GROWTH_STEP = 64  # capacity grows in multiples of this many positions


class SlotCache(Cache):
    def __init__(self, slots: int, max_positions: int) -> None:
        super().__init__(layers=[])  # storage is ours: the per-layer tensors below
        self.slots = slots
        self.max_positions = max_positions  # the model's context: no row is ever longer
        self.capacity = 0  # positions allocated per slot (+1 for the bin)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        # Set by ``plan`` for the next forward:
        self._slots: slice | torch.Tensor = slice(0, 0)
        self._write_pos: torch.Tensor | None = None  # [rows, columns] position of each column's key
        self._kv_len = 0

    # ---------------------------------------------------------------- planning a forward
    def plan(self, slots: slice | torch.Tensor, write_pos: torch.Tensor, kv_len: int) -> None:
        """The next forward covers ``slots`` (a range, read as a view, or slot indices, gathered);
        column ``c`` of row ``r`` goes to ``write_pos[r, c]`` (``bin_position`` for padding); attention
        reads the first ``kv_len`` positions."""
        self.reserve(kv_len)
        self._slots, self._write_pos, self._kv_len = slots, write_pos, kv_len

    @property
    def bin_position(self) -> int:
        return self.capacity

    def reserve(self, positions: int) -> None:
        """Make room for ``positions`` per slot (grows every allocated layer, copying what it holds)."""
        if positions <= self.capacity:
            return
        new = min(max(positions, 2 * self.capacity), self.max_positions)
        new = max(-(-new // GROWTH_STEP) * GROWTH_STEP, positions)
        for store in (self.keys, self.values):
            for layer, old in store.items():
                grown = old.new_zeros(old.shape[0], old.shape[1], new + 1, old.shape[3])
                grown[:, :, : self.capacity] = old[:, :, : self.capacity]
                store[layer] = grown
        self.capacity = new

    # ---------------------------------------------------------------- transformers' Cache API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx not in self.keys:
            shape = (self.slots, key_states.shape[1], self.capacity + 1, key_states.shape[3])
            self.keys[layer_idx] = key_states.new_zeros(shape)
            self.values[layer_idx] = value_states.new_zeros(shape[:3] + (value_states.shape[3],))
        keys, values, slots = self.keys[layer_idx], self.values[layer_idx], self._slots
        if isinstance(slots, slice):  # a range of slots: write and read through a view
            keys, values = keys[slots], values[slots]
            rows = torch.arange(keys.shape[0], device=keys.device)[:, None]
        else:
            rows = slots[:, None]
        keys[rows, :, self._write_pos] = key_states.transpose(1, 2)
        values[rows, :, self._write_pos] = value_states.transpose(1, 2)
        if isinstance(slots, slice):
            return keys[:, :, : self._kv_len], values[:, :, : self._kv_len]
        return keys[slots, :, : self._kv_len], values[slots, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._kv_len, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def is_compileable(self) -> bool:
        return False

    # ---------------------------------------------------------------- slots
    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` positions into slot ``dst``."""
        if src == dst or length <= 0:
            return
        for store in (self.keys, self.values):
            for tensor in store.values():
                tensor[dst, :, :length] = tensor[src, :, :length]

    def swap(self, a: int, b: int, length: int) -> None:
        """Exchange the first ``length`` positions of slots ``a`` and ``b``."""
        if a == b or length <= 0:
            return
        for store in (self.keys, self.values):
            for tensor in store.values():
                held = tensor[a, :, :length].clone()
                tensor[a, :, :length] = tensor[b, :, :length]
                tensor[b, :, :length] = held

    def read(self, slot: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of one slot's first ``length`` keys and values, per layer (a prefix-cache entry)."""
        return [(self.keys[i][slot, :, :length].clone(), self.values[i][slot, :, :length].clone())
                for i in range(len(self.keys))]

    def write(self, slot: int, entries: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put keys and values read from another slot (``read``) at positions 0... of ``slot``."""
        length = entries[0][0].shape[1] if entries else 0
        self.reserve(length)
        for i, (keys, values) in enumerate(entries):
            if i not in self.keys:  # a fresh cache: shape the layer from the entry
                self.keys[i] = keys.new_zeros(self.slots, keys.shape[0], self.capacity + 1, keys.shape[2])
                self.values[i] = values.new_zeros(self.slots, values.shape[0], self.capacity + 1, values.shape[2])
            self.keys[i][slot, :, :length] = keys
            self.values[i][slot, :, :length] = values

    @property
    def ready(self) -> bool:
        """Whether every layer has its tensors (after the first forward)."""
        return bool(self.keys)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in (self.keys, self.values) for t in store.values())
