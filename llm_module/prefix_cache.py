"""Keys and values of prompt prefixes that many requests share.

Every chat prompt starts with the same turns: the template's system turn and the opening of
the user turn, about two thirds of a short question's tokens with the default model. Their
keys and values are computed once per (prefix, adapter) and handed to ``generate`` as a
filled cache, so prefill only runs the part that differs. A batch uses it when all its rows
start with the same prefix; the rows' own tokens are left-padded after it, and the padding
mask keeps the holes out of attention (positions come from the mask, so they match an
uncached run).

The engine clears the cache whenever the model or an adapter changes (``clear``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

KeyValues = list[tuple[Any, Any]]  # per layer: keys and values, [1, heads, tokens, head_dim] tensors


@dataclass
class PrefixedBatch:
    """Model inputs for rows that all start with ``prefix``: its cache plus every row's own tokens."""

    input_ids: Any  # prefix, then each row's tokens left-padded
    attention_mask: Any
    past_key_values: Any  # a DynamicCache holding the prefix for every row


class PrefixCache:
    def __init__(self, max_entries: int = 32, min_tokens: int = 4) -> None:
        self.max_entries = max_entries
        self.min_tokens = min_tokens
        self._entries: OrderedDict[tuple, KeyValues] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def key_values(self, prefix: Sequence[int], adapter: str | None,
                   compute: Callable[[list[int], str | None], KeyValues]) -> KeyValues:
        """The prefix's keys and values under ``adapter``, computed by ``compute`` on a miss."""
        key = (adapter, tuple(prefix))
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return found
        found = compute(list(prefix), adapter)
        with self._lock:
            self.misses += 1
            self._entries[key] = found
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return found

    def batch(self, rows: list[list[int]], prefix: list[int], row_adapters: Sequence[str | None],
              compute: Callable[[list[int], str | None], KeyValues], pad_id: int, config) -> PrefixedBatch | None:
        """Inputs that reuse ``prefix``'s cache, or None when some row does not start with it."""
        import torch  # here, not at import: the engine imports this module before any model exists
        from transformers import DynamicCache

        size = len(prefix)
        if size < self.min_tokens or any(len(r) <= size or r[:size] != prefix for r in rows):
            return None
        per_adapter = {a: self.key_values(prefix, a, compute) for a in dict.fromkeys(row_adapters)}
        layers = [
            tuple(torch.cat([per_adapter[a][i][j] for a in row_adapters]) for j in (0, 1))
            for i in range(len(per_adapter[row_adapters[0]]))
        ]
        ids, mask = left_padded([r[size:] for r in rows], pad_id, head=prefix)
        return PrefixedBatch(ids, mask, DynamicCache(ddp_cache_data=layers, config=config))


def left_padded(rows: list[list[int]], pad_id: int, head: Sequence[int] = ()) -> tuple[Any, Any]:
    """(input_ids, attention_mask): ``head`` then each row left-padded to the longest."""
    import torch

    longest, size = max(len(r) for r in rows), len(head)
    ids = torch.full((len(rows), size + longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    if size:
        ids[:, :size], mask[:, :size] = torch.tensor(list(head)), 1
    for i, row in enumerate(rows):
        ids[i, size + longest - len(row):] = torch.tensor(row)
        mask[i, size + longest - len(row):] = 1
    return ids, mask
