"""Keys and values of prompt prefixes that many requests share.

Every chat prompt starts with the same turns: the template's system turn and the opening of the
user turn, about two thirds of a short question's tokens with the default model. Their keys and
values are kept per (prefix, adapter) after the first row computed them; a later row that starts
with that prefix gets them copied into its slot and prefills only the rest of its prompt. A
position's keys and values depend only on the tokens up to it, so the copy is what the row would
have computed itself.

The serving core clears it whenever the model or an adapter changes (``clear``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

KeyValues = list[tuple[Any, Any]]  # per layer: keys and values, [kv_heads, tokens, head_dim]


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

    def get(self, prefix: Sequence[int], adapter: str | None) -> KeyValues | None:
        if len(prefix) < self.min_tokens:
            return None
        key = (adapter, tuple(prefix))
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found

    def put(self, prefix: Sequence[int], adapter: str | None, entry: KeyValues) -> None:
        with self._lock:
            self._entries[(adapter, tuple(prefix))] = entry
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
