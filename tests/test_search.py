"""Search methods on the engine: what each algorithm promises, on the tiny model."""

import pytest

from decalign import DecalignError, generate
from decalign.sampling import Sampling, derive_seed  # prompt 0 of seed s draws from derive_seed(s, 0)


def length_reward(prompts, responses):
    return [float(len(r)) for r in responses]


def test_speculative_rejection_without_rejection_is_best_of_n(engine):
    prompts = ["hi", "The answer is"]
    bon = generate(prompts, method="bon", model=engine, reward=length_reward, n=5, max_new_tokens=14, seed=2)
    spec = generate(prompts, method="spec_rejection", model=engine, reward=length_reward, budget=5, alpha=0,
                    interval=4, max_new_tokens=14, seed=2)
    for mine, theirs in zip(spec, bon):
        assert mine.tokens == theirs.tokens and mine.reward == theirs.reward
        assert [c.tokens for c in mine.candidates] == [c.tokens for c in theirs.candidates]
        assert mine.stats["reward_calls"] == theirs.stats["reward_calls"] == 5
        assert mine.stats["stopped"] == 0


def test_speculative_rejection_halves_the_candidates_at_each_decision(engine):
    (result,) = generate("hi", method="spec_rejection", model=engine, reward=length_reward, budget=8, alpha=0.5,
                         interval=8, max_new_tokens=40, min_new_tokens=40, seed=1)
    # 8 rows for 8 tokens, then 4, 2, 1, 1: seven stopped, and only the survivor is ever finished
    assert result.stats["stopped"] == 7 and result.stats["decisions"] == 3
    assert result.stats["generated_tokens"] == 8 * 8 + 4 * 8 + 2 * 8 + 8 + 8
    assert len(result.candidates) == 1 and len(result.tokens) == 40
    assert result.stats["reward_calls"] == 1 + 8 + 4 + 2  # the final answer, then the partial answers at each decision


def test_speculative_rejection_keeps_the_best_partial_answers(engine):
    """With the reward's own prefix scores, the survivor of each decision outscores those stopped: the
    final answer's first 8 tokens score at least as high as every other candidate's first 8."""
    (result,) = generate("hi", method="spec_rejection", model=engine, reward=length_reward, budget=6, alpha=0.9,
                         interval=8, max_new_tokens=16, min_new_tokens=16, seed=4)
    batch = engine.start([engine.render("hi")], n=6, seeds=[derive_seed(4, 0)], max_new_tokens=8, min_new_tokens=8)
    batch.extend(Sampling(1.0))
    firsts = [len(engine.decode(tokens)) for tokens in batch.tokens]
    assert len(engine.decode(result.tokens[:8])) == max(firsts)


def test_blockwise_with_one_candidate_is_sampling(engine):
    prompts = ["hi", "Paris is"]
    sampled = generate(prompts, method="sample", model=engine, max_new_tokens=20, seed=6, temperature=0.9)
    searched = generate(prompts, method="blockwise", model=engine, reward=length_reward, budget=1, block=6,
                        max_new_tokens=20, seed=6, temperature=0.9)
    assert [r.tokens for r in searched] == [r.tokens for r in sampled]


def test_blockwise_keeps_the_best_block(engine):
    """Each kept block is the best of its K by the score: with the length reward's prefix scores, the
    answer's first block is the longest text among the K first blocks."""
    (result,) = generate("hi", method="blockwise", model=engine, reward=length_reward, budget=4, block=5,
                         max_new_tokens=10, min_new_tokens=10, seed=3)
    batch = engine.start([engine.render("hi")], n=4, seeds=[derive_seed(3, 0)], max_new_tokens=5, min_new_tokens=5)
    batch.extend(Sampling(1.0))
    assert len(engine.decode(result.tokens[:5])) == max(len(engine.decode(t)) for t in batch.tokens)
    assert result.stats["blocks"] == 2


@pytest.mark.parametrize("method, params, message", [
    ("spec_rejection", {"budget": 0}, "budget must be >= 1"),
    ("spec_rejection", {"alpha": 1.0}, r"alpha must be in \[0, 1\)"),
    ("spec_rejection", {"interval": 0}, "interval must be >= 1"),
    ("blockwise", {"budget": 0}, "budget must be >= 1"),
    ("blockwise", {"block": 0}, "block must be >= 1"),
])
def test_bad_search_parameters_are_named(engine, method, params, message):
    with pytest.raises(DecalignError, match=message):
        generate("hi", method=method, model=engine, reward=length_reward, **params)
