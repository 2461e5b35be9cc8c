"""Each row's sampling settings do what transformers' own logits processors do, row by row.

The serving core applies penalties and warpers itself, per row (serving/sampling.py); here each is
compared with the transformers processor it stands in for, on random scores, so an option keeps
its meaning; and each option changes what it should in a real generation.
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation import logits_process as hf

from llm_module.options import SamplingParams
from llm_module.serving import sampling
from llm_module.serving.sampling import RowSampling, _penalise, _warp, draw, pick_tokens

VOCAB = 64
PROMPT = [3, 5, 7, 5, 9]
GENERATED = [11, 3, 12, 11]


def _state(**options) -> RowSampling:
    params = SamplingParams(max_new_tokens=20, eos_ids=frozenset({0, 1}), **options)
    state = RowSampling.create(params, PROMPT, row_seed=7)
    generated: list[int] = []
    for token in GENERATED:
        generated.append(token)
        state.accept(token, generated)
    return state


def _scores(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


IDS = torch.tensor([PROMPT + GENERATED])


@pytest.mark.parametrize(("options", "processor", "changes"), [
    ({"repetition_penalty": 1.7}, hf.RepetitionPenaltyLogitsProcessor(1.7), True),
    ({"repetition_penalty": 0.6}, hf.RepetitionPenaltyLogitsProcessor(0.6), True),
    ({"no_repeat_ngram_size": 2}, hf.NoRepeatNGramLogitsProcessor(2), True),  # "11" was followed by "3" before
    ({"no_repeat_ngram_size": 3}, hf.NoRepeatNGramLogitsProcessor(3), False),  # "12 11" never seen before
    ({"min_new_tokens": 6}, hf.MinNewTokensLengthLogitsProcessor(len(PROMPT), 6, [0, 1]), True),
    ({"min_new_tokens": 3}, hf.MinNewTokensLengthLogitsProcessor(len(PROMPT), 3, [0, 1]), False),  # 4 are there
])
def test_penalties_equal_transformers_processors(options, processor, changes):
    for seed in range(3):
        scores = _scores(seed)
        ours = _penalise(scores, [_state(**options)], [GENERATED])
        torch.testing.assert_close(ours, processor(IDS, scores.clone()), rtol=0, atol=0)
        assert torch.equal(ours, scores) is not changes


@pytest.mark.parametrize(("options", "processors"), [
    ({"temperature": 0.6}, [hf.TemperatureLogitsWarper(0.6)]),
    ({"top_k": 5}, [hf.TopKLogitsWarper(5)]),
    ({"top_p": 0.8}, [hf.TopPLogitsWarper(0.8)]),
    ({"min_p": 0.1}, [hf.MinPLogitsWarper(0.1)]),
    ({"typical_p": 0.7}, [hf.TypicalLogitsWarper(0.7)]),
    ({"temperature": 1.3, "top_k": 20, "top_p": 0.9},
     [hf.TemperatureLogitsWarper(1.3), hf.TopKLogitsWarper(20), hf.TopPLogitsWarper(0.9)]),
])
def test_warpers_equal_transformers_warpers(options, processors):
    for seed in range(3):
        scores = _scores(seed)
        expected = scores.clone()
        for processor in processors:
            expected = processor(IDS, expected)
        ours = _warp(scores, [_state(do_sample=True, **options)])
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("candidates", [2, 8, 24])
def test_top_p_ranks_few_candidates_where_they_hold_the_mass_and_the_vocabulary_where_not(monkeypatch, candidates):
    """With fewer candidates than the nucleus needs a row sorts all its tokens: either way the
    result is transformers' (peaked rows, as a language model's, and flat ones)."""
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", candidates)
    for seed in range(4):
        flat = _scores(seed)
        peaked = flat.clone()
        peaked[0, :6] += torch.tensor([9.0, 8.0, 7.5, 6.0, 3.0, 2.0])
        for scores in (flat, peaked):
            for top_p in (0.3, 0.9):
                expected = hf.TopPLogitsWarper(top_p)(IDS, scores.clone())
                ours = _warp(scores.clone(), [_state(do_sample=True, top_p=top_p)])
                torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def test_draws_follow_the_probabilities_and_never_pick_an_impossible_token():
    probs = torch.zeros(2, VOCAB)
    probs[0, [3, 10, 63]] = torch.tensor([0.5, 0.3, 0.2])
    probs[1, 0] = 1.0
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    counts = torch.zeros(VOCAB)
    for _ in range(4000):
        tokens = draw(probs, generators)
        assert tokens[1] == 0
        counts[tokens[0]] += 1
    assert set(counts.nonzero().flatten().tolist()) == {3, 10, 63}  # the last token too, none of the zeros
    torch.testing.assert_close(counts[[3, 10, 63]] / 4000, torch.tensor([0.5, 0.3, 0.2]), rtol=0, atol=0.03)
    again = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    first = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    assert torch.equal(draw(probs, again), draw(probs, first))  # a seed gives the same draw


def test_rows_with_different_settings_in_one_batch_each_get_their_own():
    states = [_state(do_sample=True, top_k=3), _state(do_sample=True, top_p=0.5, temperature=0.7), _state()]
    scores = torch.cat([_scores(1), _scores(2), _scores(3)])
    warped = _warp(scores[:2], states[:2])
    torch.testing.assert_close(warped[0:1], hf.TopKLogitsWarper(3)(IDS, scores[0:1].clone()))
    torch.testing.assert_close(warped[1:2], hf.TopPLogitsWarper(0.5)(IDS, hf.TemperatureLogitsWarper(0.7)(
        IDS, scores[1:2].clone())))
    picks = pick_tokens(scores, states, [GENERATED] * 3)
    assert picks[2].token == int(scores[2].argmax())  # the greedy row
    assert picks[0].token in scores[0].topk(3).indices.tolist()


def test_a_seeded_row_draws_the_same_tokens_whatever_its_batch_mates():
    lone = _state(do_sample=True, seed=5)
    alone = [pick_tokens(_scores(s), [lone], [GENERATED])[0].token for s in range(5)]
    state = _state(do_sample=True, seed=5)
    mate = _state(do_sample=True)
    with_mate = [pick_tokens(torch.cat([_scores(s), _scores(s + 100)]), [state, mate], [GENERATED] * 2)[0].token
                 for s in range(5)]
    assert with_mate == alone


def test_logprobs_and_entropy_come_from_the_model_own_distribution():
    scores = _scores(4)
    pick = pick_tokens(scores, [_state(logprobs=2, entropy=True, repetition_penalty=2.0)], [GENERATED])[0]
    log_probs = torch.log_softmax(scores[0], dim=-1)
    assert pick.logprob == pytest.approx(float(log_probs[pick.token]))
    assert [t for t, _ in pick.top] == log_probs.topk(2).indices.tolist()
    assert pick.entropy == pytest.approx(float(-(log_probs.exp() * log_probs).sum()), rel=1e-5)


# ------------------------------------------------------------------ through the engine
@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    from llm_module.engine import Engine
    from llm_module.engine.state import StateFile
    from llm_module.settings import Settings

    home = tmp_path_factory.mktemp("sampling")
    eng = Engine(Settings(home=home), state_file=StateFile(home / "state.json"))
    eng.setup(str(tiny_model_dir))
    yield eng
    eng.close()


def _tokens(engine, **options) -> list[int]:
    call = engine.serving.build("Hello there", do_sample=False, max_new_tokens=12, **options)
    return engine.serving.outputs(call)[0].token_ids


def test_each_option_changes_what_it_should_in_a_generation(engine):
    plain = _tokens(engine)
    assert len(set(plain)) < len(plain)  # the tiny model repeats itself: something for the options to change
    no_repeat = _tokens(engine, no_repeat_ngram_size=2)
    grams = [tuple(no_repeat[i:i + 2]) for i in range(len(no_repeat) - 1)]
    assert len(grams) == len(set(grams)) and no_repeat != plain
    penalised = _tokens(engine, repetition_penalty=5.0)
    assert penalised != plain and len(set(penalised)) > len(set(plain))
    eos = plain[2]  # make a token the model emits an end token: generation stops at its first...
    engine.host.model.generation_config.eos_token_id = eos
    try:
        assert _tokens(engine) == plain[:plain.index(eos) + 1]
        held = _tokens(engine, min_new_tokens=8)  # ...unless a minimum holds it back
        assert len(held) >= 8 and eos not in held[:8]
    finally:
        engine.host.model.generation_config.eos_token_id = engine.host.tokenizer.eos_token_id
