"""Picking each row's next token from the batch's logits, with each row's own settings.

Rows with different sampling options share one batch: penalties and warpers are applied per row
(vectorised over the rows that use them), greedy rows take the arg-max, sampling rows draw from
their own ``torch.Generator``, so a seeded row gives the same text whatever else is in the batch.
The order of the steps is transformers' (penalties, minimum length, then temperature, top-k,
top-p, min-p, typical), so an option means what it means in ``model.generate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

NEG_INF = float("-inf")
TOP_P_CANDIDATES = 1024  # tokens ranked first for top-p; past them, only where they hold under top_p


@dataclass
class RowSampling:
    """A row's sampling state: what it has seen (for penalties) and its random generator."""

    params: object  # options.SamplingParams
    prompt: list[int]
    generator: torch.Generator | None = None
    ngrams: dict[tuple, set[int]] = field(default_factory=dict)
    seen: torch.Tensor | None = None  # token ids of prompt and answer, for repetition_penalty
    counts: dict[int, int] = field(default_factory=dict)  # answer tokens, for presence/frequency penalties
    constraint: object | None = None  # serving.constraints.Constraint, for structured output

    @classmethod
    def create(cls, params, prompt: list[int], row_seed: int | None, constraint=None) -> RowSampling:
        generator = None
        if params.do_sample:
            generator = torch.Generator()
            generator.manual_seed(row_seed) if row_seed is not None else generator.seed()
        state = cls(params=params, prompt=list(prompt), generator=generator, constraint=constraint)
        if params.repetition_penalty != 1.0:
            state.seen = torch.tensor(sorted(set(prompt)), dtype=torch.long)
        size = params.no_repeat_ngram_size
        if size > 0:
            for start in range(len(prompt) - size + 1):
                state._add_ngram(prompt[start:start + size])
        return state

    def _add_ngram(self, gram: list[int]) -> None:
        self.ngrams.setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def accept(self, token: int, generated: list[int]) -> None:
        """Record ``token`` (already appended to ``generated``)."""
        params = self.params
        if self.seen is not None and not bool((self.seen == token).any()):
            self.seen = torch.cat([self.seen, torch.tensor([token])])
        if params.presence_penalty or params.frequency_penalty:
            self.counts[token] = self.counts.get(token, 0) + 1
        size = params.no_repeat_ngram_size
        if size > 0:
            history = (self.prompt + generated)[-size:]
            if len(history) == size:
                self._add_ngram(history)
        if self.constraint is not None:
            self.constraint.accept(token)

    def banned_ngram_tokens(self, generated: list[int]) -> set[int]:
        size = self.params.no_repeat_ngram_size
        history = self.prompt + generated
        if size <= 0 or len(history) < size - 1:
            return set()
        return self.ngrams.get(tuple(history[len(history) - size + 1:]) if size > 1 else (), set())


@dataclass
class Pick:
    """What sampling chose for one row, with the scores asked for."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    entropy: float | None = None


def pick_tokens(logits: torch.Tensor, states: list[RowSampling], generated: list[list[int]]) -> list[Pick]:
    """One token per row of ``logits`` ([rows, vocab], float)."""
    logits = logits.float()
    raw = logits
    processed = _penalise(logits, states, generated)
    sampling = [i for i, s in enumerate(states) if s.params.do_sample]
    greedy = [i for i, s in enumerate(states) if not s.params.do_sample]
    tokens = torch.empty(len(states), dtype=torch.long)
    if greedy:
        tokens[greedy] = processed[greedy].argmax(dim=-1)
    if sampling:
        probs = torch.softmax(_warp(_saturated(processed[sampling]), [states[i] for i in sampling]), dim=-1)
        tokens[sampling] = draw(probs, [states[i].generator for i in sampling])
    chosen = tokens.tolist()
    scored = [i for i, s in enumerate(states) if s.params.logprobs is not None or s.params.entropy]
    logprobs = torch.log_softmax(raw[scored], dim=-1) if scored else None
    picks = [Pick(token) for token in chosen]
    for row, i in enumerate(scored):
        params, pick = states[i].params, picks[i]
        pick.logprob = float(logprobs[row, pick.token])
        if params.logprobs:
            values, ids = logprobs[row].topk(params.logprobs)
            pick.top = list(zip(ids.tolist(), values.tolist(), strict=True))
        if params.entropy:
            pick.entropy = float(-(logprobs[row].exp() * logprobs[row]).sum())
    return picks


def draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of ``probs`` ([rows, vocab]), each from its own generator: where one
    uniform number falls in the row's cumulative distribution. (torch.multinomial draws an
    exponential number for every token of the vocabulary: ~1 ms a row at 49,152 tokens.)"""
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    uniform = torch.cat([torch.rand(1, dtype=torch.float64, generator=g) for g in generators])[:, None]
    # Below the total, so the point lands on a token with probability (not past the last one).
    point = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, point, right=True).squeeze(-1)


def _penalise(logits: torch.Tensor, states: list[RowSampling], generated: list[list[int]]) -> torch.Tensor:
    """Penalties, minimum lengths and constraints: rows that need none are left untouched."""
    out = logits
    for i, state in enumerate(states):
        params = state.params
        needs_min = len(generated[i]) < params.min_new_tokens and params.eos_ids
        if not (params.penalised or needs_min or state.constraint is not None):
            continue
        if out is logits:
            out = logits.clone()
        row = out[i]
        if state.seen is not None:
            scores = row[state.seen]
            penalty = params.repetition_penalty
            row[state.seen] = torch.where(scores < 0, scores * penalty, scores / penalty)
        if state.counts:
            ids = torch.tensor(list(state.counts), dtype=torch.long)
            counts = torch.tensor(list(state.counts.values()), dtype=row.dtype)
            row[ids] -= params.frequency_penalty * counts + params.presence_penalty
        banned = state.banned_ngram_tokens(generated[i])
        if banned:
            row[list(banned)] = NEG_INF
        if needs_min:
            row[list(params.eos_ids)] = NEG_INF
        if state.constraint is not None:
            state.constraint.mask(row)
    return out


def _warp(logits: torch.Tensor, states: list[RowSampling]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p and typical-p, each row with its own values."""
    params = [s.params for s in states]
    if not any(p.needs_warping for p in params):
        return logits
    logits = logits.clone()
    # A temperature outside the dtype's normal range would be 0 or inf in it (and 0 / 0, inf / inf NaNs).
    finfo = torch.finfo(logits.dtype)
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float64)[:, None].clamp(
        min=finfo.tiny, max=finfo.max).to(logits.dtype)
    if bool((temps != 1.0).any()):
        scaled = logits / temps
        overflow = (~torch.isfinite(scaled) & torch.isfinite(logits)).any(dim=-1)
        if bool(overflow.any()):  # a tiny temperature: shifted by the row's maximum it tends to greedy, not to NaN
            shifted = logits[overflow] - logits[overflow].amax(dim=-1, keepdim=True)
            scaled[overflow] = shifted / temps[overflow]
        logits = scaled
    top_ks = [min(p.top_k, logits.shape[-1]) for p in params]
    if any(top_ks):
        kth = logits.topk(max(top_ks), dim=-1).values
        for row, k in enumerate(top_ks):
            if k:
                logits[row][logits[row] < kth[row, k - 1]] = NEG_INF
    nucleus = [row for row, p in enumerate(params) if p.top_p < 1.0]
    if nucleus:
        top_ps = torch.tensor([params[row].top_p for row in nucleus], dtype=logits.dtype)
        logits[nucleus] = _top_p(logits[nucleus], top_ps)
    min_ps = torch.tensor([p.min_p for p in params], dtype=logits.dtype)
    if bool((min_ps > 0).any()):
        probs = logits.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * min_ps[:, None]
        logits = logits.masked_fill(probs < threshold, NEG_INF)
    for row, p in enumerate(params):
        if p.typical_p < 1.0:
            logits[row] = _typical(logits[row], p.typical_p)
    return logits


def _top_p(logits: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """transformers' TopPLogitsWarper per row: a token stays while the tokens more likely than it
    hold less than ``top_p`` of the probability, the most likely one always.

    Sorting the whole vocabulary is the costly part (~4 ms a row for 49,152 tokens), so each row
    first looks at its ``TOP_P_CANDIDATES`` most likely tokens: where they hold ``top_p`` (as in
    nearly every step of a language model), every token past them goes and only they are ranked;
    the other rows sort their whole vocabulary."""
    k = min(TOP_P_CANDIDATES, logits.shape[-1])
    values, ids = logits.topk(k, dim=-1)  # most likely first
    probs = (values - logits.logsumexp(dim=-1, keepdim=True)).exp()
    keep = probs.cumsum(dim=-1) - probs < top_ps[:, None]  # the mass of the tokens before each one
    keep[:, 0] = True
    covered = probs.sum(dim=-1) >= top_ps
    out = torch.full_like(logits, NEG_INF).scatter(-1, ids, values.masked_fill(~keep, NEG_INF))
    wide = (~covered).nonzero().flatten().tolist()
    if wide:
        ordered, order = logits[wide].sort(dim=-1, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_ps[wide])[:, None]
        remove[:, -1] = False  # keep at least the most likely token
        out[wide] = logits[wide].scatter(-1, order, ordered.masked_fill(remove, NEG_INF))
    return out


def _saturated(logits: torch.Tensor) -> torch.Tensor:
    """Rows a tiny repetition_penalty pushed to +inf: their +inf tokens share the probability and the rest get
    none (the limit of the division), instead of NaNs that sampling cannot draw from."""
    top = torch.isposinf(logits)
    rows = top.any(dim=-1)
    if not bool(rows.any()):
        return logits
    logits = logits.clone()
    logits[rows] = torch.where(top[rows], 0.0, NEG_INF)
    return logits


def _typical(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """transformers' TypicalLogitsWarper for one row."""
    log_probs = torch.log_softmax(logits, dim=-1)
    entropy = -(log_probs.exp() * log_probs).nansum()
    shifted = (-log_probs - entropy).abs()
    ordered, order = shifted.sort()
    cumulative = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = int((cumulative < mass).sum().clamp(max=len(cumulative) - 1))
    remove = ordered > ordered[last]
    remove[0] = False  # keep at least one token
    return logits.masked_fill(remove.scatter(0, order, remove), NEG_INF)
