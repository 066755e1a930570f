"""Search methods on the engine: what each algorithm promises, on the tiny model."""

import math
from collections import Counter

import pytest
import scipy.stats
import torch

from decalign import DecalignError, generate
from decalign.rewards import Reward
from decalign.sampling import Sampling, derive_seed, transformed  # prompt 0 of seed s draws from derive_seed(s, 0)


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


@pytest.mark.parametrize("method", ["blockwise", "smc"])
def test_search_with_one_candidate_is_sampling(engine, method):
    prompts = ["hi", "Paris is"]
    sampled = generate(prompts, method="sample", model=engine, max_new_tokens=20, seed=6, temperature=0.9)
    searched = generate(prompts, method=method, model=engine, reward=length_reward, budget=1, block=6,
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


def test_treebon_without_branching_is_best_of_n(engine):
    prompts = ["hi", "The answer is"]
    bon = generate(prompts, method="bon", model=engine, reward=length_reward, n=4, max_new_tokens=14, seed=5)
    tree = generate(prompts, method="treebon", model=engine, reward=length_reward, budget=4, children=1, segment=3,
                    max_new_tokens=14, seed=5)
    for mine, theirs in zip(tree, bon):
        assert mine.reward == theirs.reward and mine.stats["pruned"] == 0
        assert sorted(c.tokens for c in mine.candidates) == sorted(c.tokens for c in theirs.candidates)


def test_treebon_prunes_exactly_the_lowest_scored_children(engine):
    """At each layer the budget // children best-scored partial answers are kept (the first of equals)
    and each branches into `children` candidates of the next layer."""
    (result,) = generate("hi", method="treebon", model=engine, reward=length_reward, budget=8, children=2, segment=4,
                         max_new_tokens=16, min_new_tokens=16, seed=7, trace=True)
    assert [layer["layer"] for layer in result.trace] == [1, 2, 3]
    for layer, following in zip(result.trace, result.trace[1:]):
        scores = layer["scores"]
        assert scores == [float(len(text)) for text in layer["texts"]]
        assert layer["kept"] == sorted(sorted(range(8), key=lambda i: -scores[i])[:4])
        parents = Counter(layer["texts"][i] for i in layer["kept"])
        children = Counter(next(p for p in parents if text.startswith(p.rstrip("\ufffd")))  # a split character
                           for text in following["texts"])
        assert children == Counter({parent: 2 * count for parent, count in parents.items()})
    assert result.stats["pruned"] == 3 * 4
    assert len(engine.decode(result.tokens[:12])) == max(result.trace[-1]["scores"])


def test_treebon_whose_candidates_end_early_grows_only_the_rows_it_has(engine):
    """Candidates that end (here on a stop string) leave the tree, so a layer can keep fewer parents
    than budget // children; the next layers branched budget // children parents anyway and failed
    with '4 copies do not fit in 2 rows'."""
    narrowed = 0
    for seed in range(8):
        (result,) = generate("hi", method="treebon", model=engine, reward=length_reward, budget=4, children=2,
                             segment=3, stop=["y"], max_new_tokens=10, seed=seed, trace=True)
        assert result.finish_reason in ("stop", "length") and result.candidates
        for layer, following in zip(result.trace, result.trace[1:]):
            assert len(following["texts"]) <= 2 * len(layer["kept"])  # unfinished children of the kept parents
        narrowed += any(len(layer["kept"]) < 2 for layer in result.trace)
    assert narrowed  # the case the test is for happened


def test_smc_streams_the_prefix_its_particles_agree_on(engine):
    """What SMC publishes is what every particle shares: each text extends the last and the answer
    extends them all; resampling on a sharp target makes the particles agree early."""
    published = []
    (result,) = generate("hi", method="smc", model=engine, reward=length_reward, budget=6, block=2, beta=0.05,
                         ess_threshold=1.0, max_new_tokens=24, min_new_tokens=24, seed=3,
                         listener=lambda _, text: published.append(text))
    assert len(published) >= 3 and result.stats["resamples"] >= 5
    for earlier, later in zip(published, published[1:] + [result.text]):
        assert later.startswith(earlier) and len(later) > len(earlier) or later == result.text


def test_search_methods_never_keep_more_rows_than_their_budget(engine, monkeypatch):
    from decalign.engine import Batch

    most: dict[str, int] = {}
    advance = Batch.advance

    def counted(batch, moves, **kwargs):
        rows = Counter(batch.prompt_of[s.row] for move in moves for s in getattr(move, "segments", []))
        rows.update(batch.prompt_of[r] for move in moves for r in getattr(move, "tokens", {}))
        most[method] = max([most.get(method, 0), *rows.values()])
        return advance(batch, moves, **kwargs)

    monkeypatch.setattr(Batch, "advance", counted)
    for method, params in [("smc", {"block": 3}), ("treebon", {"children": 2, "segment": 3}),
                           ("spec_rejection", {"interval": 3}), ("blockwise", {"block": 3})]:
        generate(["hi", "bread"], method=method, model=engine, reward=length_reward, budget=5, max_new_tokens=12,
                 seed=2, **params)
        assert 1 <= most[method] <= 5, (method, most)


@pytest.mark.parametrize("method, params, message", [
    ("smc", {"budget": 0}, "budget must be >= 1"),
    ("smc", {"ess_threshold": 1.5}, r"ess_threshold must be in \[0, 1\]"),
    ("smc", {"beta": 0}, "beta must be > 0"),
    ("smc", {"pick": "first"}, "pick must be one of best, sample"),
    ("smc", {"block": 0}, "block must be >= 1"),
    ("treebon", {"budget": 0}, "budget must be >= 1"),
    ("treebon", {"children": 9}, r"children must be in \[1, budget = 8\]"),
    ("treebon", {"segment": 0}, "segment must be >= 1"),
    ("spec_rejection", {"budget": 0}, "budget must be >= 1"),
    ("spec_rejection", {"alpha": 1.0}, r"alpha must be in \[0, 1\)"),
    ("spec_rejection", {"interval": 0}, "interval must be >= 1"),
    ("blockwise", {"budget": 0}, "budget must be >= 1"),
    ("blockwise", {"block": 0}, "block must be >= 1"),
])
def test_bad_search_parameters_are_named(engine, method, params, message):
    with pytest.raises(DecalignError, match=message):
        generate("hi", method=method, model=engine, reward=length_reward, **params)


def even_share(text: str) -> float:
    """A toy reward: the share of characters with an even code point."""
    return sum(ord(c) % 2 == 0 for c in text) / max(1, len(text))


class TwoTokenTarget:
    """Two-token answers under top-3 sampling (nine answers): the policy's exact probabilities q(y), a
    toy reward r(y), and the target q(y) exp(r(y) / beta) that SMC with pick=sample draws from."""

    def __init__(self, engine, prompt: str, beta: float):
        self.engine, self.beta, self.sampling = engine, beta, Sampling(1.0, top_k=3)
        self.ids = engine.render(prompt)
        first = self.proposal([])
        self.policy = {(a, b): pa * pb for a, pa in first.items() for b, pb in self.proposal([a]).items()}
        weight = {y: q * math.exp(self.reward(y) / beta) for y, q in self.policy.items()}
        self.target = {y: w / sum(weight.values()) for y, w in weight.items()}
        # the exact twist: V(a) = beta log E_q[exp(r / beta) | a], keyed by the first token's text
        self.twist = {engine.decode([a]): beta * math.log(sum(
            q * math.exp(self.reward(y) / beta) for y, q in self.policy.items() if y[0] == a) / pa)
            for a, pa in first.items()}
        assert len(self.twist) == 3, "first tokens must decode to distinct texts"

    def proposal(self, prefix):
        """q(. | prefix) as the engine samples it: EOS masked (min_new_tokens), then top 3."""
        with torch.no_grad():
            logits = self.engine.model(torch.tensor([self.ids + prefix])).logits[0, -1].float()
        logits[sorted(self.engine.eos_ids)] = float("-inf")
        probs = transformed(logits[None], self.sampling.transforms)[0].softmax(-1)
        return {int(t): float(probs[t]) for t in probs.nonzero().flatten()}

    def reward(self, tokens) -> float:
        return even_share(self.engine.decode(list(tokens)))

    def scorer(self, *, exact_twist: bool) -> Reward:
        target = self

        class Toy(Reward):
            def _score(self, prompts, responses):
                return [even_share(r) for r in responses]

            def _score_prefix(self, prompts, partials):
                return [target.twist[p] if exact_twist else 0.0 for p in partials]

        return Toy()


def goodness_of_fit(counts: Counter, probabilities: dict) -> float:
    """Chi-square p-value of counts against probabilities (bins under 5 expected merged)."""
    total = sum(counts.values())
    bins, pending = [], [0.0, 0.0]
    for key, p in sorted(probabilities.items(), key=lambda item: item[1]):
        pending = [pending[0] + counts.get(key, 0), pending[1] + total * p]
        if pending[1] >= 5:
            bins.append(pending)
            pending = [0.0, 0.0]
    bins[-1] = [bins[-1][0] + pending[0], bins[-1][1] + pending[1]]
    statistic = sum((seen - expected) ** 2 / expected for seen, expected in bins)
    return float(scipy.stats.chi2.sf(statistic, len(bins) - 1))


@pytest.mark.parametrize("exact_twist, ess_threshold", [(True, 1.0), (False, 0.5)])
def test_smc_draws_from_the_target(engine, exact_twist, ess_threshold):
    """SMC with pick=sample draws answers from q(y) exp(r(y) / beta): with the exact twist and
    resampling at every step, and with a flat twist (weights only at the end) alike. The test has
    power: the same counts do not fit the policy's own distribution."""
    toy = TwoTokenTarget(engine, "Paris is", beta=0.25)
    results = generate(["Paris is"] * 1500, method="smc", model=engine, reward=toy.scorer(exact_twist=exact_twist),
                       budget=32, block=1, beta=0.25, ess_threshold=ess_threshold, pick="sample", top_k=3,
                       max_new_tokens=2, min_new_tokens=2, seed=11 if exact_twist else 12, batch_size=300)
    counts = Counter(tuple(r.tokens) for r in results)
    assert set(counts) <= set(toy.target)
    assert goodness_of_fit(counts, toy.target) > 0.001, (counts, toy.target)
    assert goodness_of_fit(counts, toy.policy) < 0.001
    if exact_twist:
        assert sum(r.stats["resamples"] for r in results) > 1000
