"""Forward passes for rows of the running batch, on one model and its adapters.

The runner owns the per-row state that lives next to the model: each row's keys and values in
the slot cache, each row's adapter (LoraRows), and the prefix cache. ``forward`` takes the rows
to run and the tokens each one feeds (a decode step: its last token; a prefill step: the next
chunk of its prompt), left-pads the chunks into one batch, tells the cache where each column's
keys go, builds the attention mask from each row's own positions, and returns the logits of each
row's last column. The scheduler decides which rows run when (scheduler.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch

from ..runtime.lora_rows import LoraRows, can_stack
from ..runtime.memory import trim_heap
from ..runtime.quantize import runs_on_own_kernels
from ..runtime.threads import kernels_own_the_cores
from .kv_cache import SlotCache
from .prefix_cache import PrefixCache
from .request import Row

log = logging.getLogger(__name__)
OWN_WORKERS_MAX_TOKENS = 1  # a lone row's decoding step runs on the kernels' own workers (bench/findings.md)

# Attention implementations that take a boolean mask (True: attend); the others take an additive one.
BOOLEAN_MASK_ATTENTION = ("sdpa", "llm_module_sdpa", "flex_attention")


class ModelRunner:
    def __init__(self, model, *, slots: int, context: int, pad_id: int, adapters=None,
                 prefix_cache: PrefixCache | None = None) -> None:
        """``model``: the transformers model (LoRA layers injected when adapters are loaded);
        ``adapters``: the adapter registry (its ``peft_model`` and ``names()``), or None."""
        self.model = model
        self.device = next(model.parameters()).device
        self.slots = slots
        self.context = context
        self.pad_id = pad_id
        self.cache = SlotCache(slots, context)
        self.prefixes = prefix_cache
        self.adapters = adapters
        self.slot_adapter: list[str | None] = [None] * slots
        self.lora: LoraRows | None = None
        self.peft_rows = False
        self.refresh_adapters()
        config = model.config
        self.layer_types = tuple(getattr(config, "layer_types", None) or ())
        self.window = getattr(config, "sliding_window", None) or None
        self.plain_causal = not self.layer_types and not self.window  # no mask beyond causality
        self.boolean_mask = getattr(config, "_attn_implementation", "sdpa") in BOOLEAN_MASK_ATTENTION
        self.dtype = next(model.parameters()).dtype
        self.own_kernels = runs_on_own_kernels(model)

    # ------------------------------------------------------------------ rows and slots
    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Forwards run inside this block: the per-row LoRA forwards are installed for it, and where
        the matmuls run on our kernels, torch's ops in this thread leave the cores to their workers."""
        with kernels_own_the_cores(self.own_kernels), \
                self.lora.installed() if self.lora is not None else contextlib.nullcontext():
            yield

    @torch.inference_mode()
    def place(self, row: Row, slot: int) -> None:
        """Give ``row`` its slot and its adapter."""
        row.slot = slot
        row.cached = 0
        self._set_adapter(slot, row.adapter)

    @torch.inference_mode()
    def move(self, row: Row, slot: int) -> None:
        """Move ``row`` into the free ``slot``."""
        self.cache.move(row.slot, slot, row.cached)
        self._set_adapter(slot, row.adapter)
        row.slot = slot

    @torch.inference_mode()
    def swap(self, a: Row, b: Row) -> None:
        self.cache.swap(a.slot, b.slot, max(a.cached, b.cached))
        a.slot, b.slot = b.slot, a.slot
        self._set_adapter(a.slot, a.adapter)
        self._set_adapter(b.slot, b.adapter)

    def _set_adapter(self, slot: int, adapter: str | None) -> None:
        self.slot_adapter[slot] = adapter
        if self.lora is not None:
            self.lora.assign(slot, adapter)

    @torch.inference_mode()
    def refresh_adapters(self) -> None:
        """The loaded adapters changed: rebuild the per-row tables for the rows in place (their keys
        and values stay), and forget prefixes computed under the old weights."""
        names = self.adapters.names() if self.adapters is not None else []
        self.lora = LoraRows(self.model, self.slots) if names and can_stack(self.model, names) else None
        self.peft_rows = bool(names) and self.lora is None  # peft's own forward, one adapter at a time (DoRA)
        for slot, adapter in enumerate(self.slot_adapter):
            self._set_adapter(slot, adapter if adapter in names else None)
        if self.prefixes is not None:
            self.prefixes.clear()

    def release(self) -> None:
        """Free the cache's and the per-row adapter tables' memory (the scheduler went idle)."""
        self.cache = SlotCache(self.slots, self.context)
        if self.lora is not None:
            self.lora.release_tables()
        trim_heap()

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(self, rows: Sequence[Row], chunks: Sequence[Sequence[int]], slots: slice | None = None) -> torch.Tensor:
        """Feed ``chunks[i]`` to ``rows[i]`` (after its cached positions); return each row's last logits.

        ``slots``: the rows' slots as a range (rows in slot order), else they are gathered by index.
        """
        width = max(len(c) for c in chunks)
        starts = torch.tensor([row.cached for row in rows])
        lengths = torch.tensor([len(c) for c in chunks])
        pads = width - lengths
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, chunk in enumerate(chunks):
            ids[i, width - len(chunk):] = torch.tensor(chunk)
        columns = torch.arange(width)
        positions = starts[:, None] + columns[None, :] - pads[:, None]  # [rows, width]
        padding = positions < starts[:, None]
        kv_len = int((starts + lengths).max())
        self.cache.reserve(kv_len)
        write_pos = positions.masked_fill(padding, self.cache.bin_position)
        positions = positions.masked_fill(padding, 0)
        where = slots if slots is not None else torch.tensor([row.slot for row in rows])
        # Every row one token, all at the last position: each attends to all kv_len keys, which is what
        # transformers' own causal mask gives then (none at all: the attention kernel's fastest path).
        unmasked = width == 1 and self.plain_causal and bool((starts + 1 == kv_len).all())
        masks = None if unmasked else self._masks(positions, kv_len)
        if self.peft_rows:
            logits = self._per_adapter(rows, ids, masks, positions, write_pos, kv_len)
        else:
            if self.lora is not None:
                self.lora.select(where)
            logits = self._run(self.model, where, ids, masks, positions, write_pos, kv_len)
        for row, chunk in zip(rows, chunks, strict=True):
            row.cached += len(chunk)
        return logits

    def _run(self, model, where, ids, masks, positions, write_pos, kv_len) -> torch.Tensor:
        self.cache.plan(where, write_pos.to(self.device), kv_len)
        # A batch of rows needs both cores for its attention and other torch ops more than it needs
        # to be safe from other threads' OpenMP teams (bench/findings.md).
        few = ids.numel() <= OWN_WORKERS_MAX_TOKENS
        with kernels_own_the_cores(few) if self.own_kernels else contextlib.nullcontext():
            out = model(input_ids=ids.to(self.device), attention_mask=masks, position_ids=positions.to(self.device),
                        past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _per_adapter(self, rows, ids, masks, positions, write_pos, kv_len) -> torch.Tensor:
        """peft's own forward, one adapter at a time (models whose LoRA layers cannot be stacked: peft
        refuses mixed batches with DoRA): each adapter's rows run as one forward over their slots."""
        peft_model = self.adapters.peft_model
        logits = None
        groups: dict[str | None, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(self.slot_adapter[row.slot], []).append(i)
        for adapter, members in groups.items():
            index = torch.tensor(members)
            where = torch.tensor([rows[i].slot for i in members])
            context = peft_model.disable_adapter() if adapter is None else contextlib.nullcontext()
            if adapter is not None:
                peft_model.set_adapter(adapter)
            with context:
                part = self._run(peft_model, where, ids[index], _select(masks, index), positions[index],
                                 write_pos[index], kv_len)
            if logits is None:
                logits = part.new_empty(len(rows), part.shape[-1])
            logits[index] = part
        return logits

    def _masks(self, positions: torch.Tensor, kv_len: int):
        """Each query attends to its own row's keys up to its position (within the window, if any)."""
        keys = torch.arange(kv_len)
        allowed = keys[None, None, :] <= positions[:, :, None]  # [rows, width, kv_len]
        if self.layer_types:
            masks = {}
            for kind in set(self.layer_types):
                if kind == "sliding_attention" and self.window:
                    masks[kind] = self._as_mask(allowed & (keys[None, None, :] > positions[:, :, None] - self.window))
                elif kind in ("full_attention", "sliding_attention"):
                    masks[kind] = self._as_mask(allowed)
                else:
                    raise NotImplementedError(f"llm_module cannot serve attention layers of type {kind!r} yet")
            return masks
        if self.window and getattr(self.model.config, "model_type", "") in WINDOWED_EVERY_LAYER:
            allowed &= keys[None, None, :] > positions[:, :, None] - self.window
        return self._as_mask(allowed)

    def _as_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        allowed = allowed[:, None].to(self.device)  # [rows, 1 (heads), width, kv_len]
        if self.boolean_mask:
            return allowed
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~allowed, torch.finfo(self.dtype).min)

    # ------------------------------------------------------------------ the prefix cache
    def prefix_key(self, row: Row) -> tuple | None:
        """The prefix-cache key of a row not prefilled yet whose prompt starts with a shared prefix."""
        prefix = row.request.prefix
        if (self.prefixes is None or row.cached or len(prefix) < self.prefixes.min_tokens
                or len(prefix) >= len(row.prompt)):
            return None
        return row.adapter, tuple(prefix)

    @torch.inference_mode()
    def reuse_prefix(self, row: Row) -> bool:
        """Copy the row's cached prefix keys and values into its slot, if they are cached."""
        entry = self.prefixes.get(row.request.prefix, row.adapter)
        if entry is None:
            return False
        self.cache.write(row.slot, entry)
        row.cached = len(row.request.prefix)
        return True

    @torch.inference_mode()
    def remember_prefix(self, row: Row) -> None:
        """Store ``row``'s prefix keys and values once its prefill computed them."""
        if self.prefixes is not None and row.prefix_len and row.cached >= row.prefix_len:
            self.prefixes.put(row.request.prefix, row.adapter, self.cache.read(row.slot, row.prefix_len))
            row.prefix_len = 0


def _select(masks, index: torch.Tensor):
    """The rows ``index`` of a mask, or of each mask of a per-layer-type dict."""
    if masks is None:
        return None
    if isinstance(masks, dict):
        return {kind: mask[index] for kind, mask in masks.items()}
    return masks[index]


# Model types whose every layer uses the sliding window when the config sets one (no layer_types).
WINDOWED_EVERY_LAYER = ("mistral", "mixtral", "phi3", "starcoder2")
