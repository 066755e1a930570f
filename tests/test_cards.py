"""CARDS, item-level rejection sampling and ARGS on the tiny model with toy rewards."""

import math
from collections import Counter

import pytest
import torch

from decalign import DecalignError, generate
from decalign.engine import Batch
from decalign.methods.cards import relative_threshold, threshold
from decalign.methods.rejection import accept_probability, calibrate

# chi-square critical values at p = 0.001
CHI2_001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88, 10: 29.59}


def even_share(prompts, responses, engine=None):
    """A toy reward: how many characters of the answer are vowels, per character."""
    return [sum(c in "aeiou" for c in r) / max(1, len(r)) for r in responses]


def even_characters(prompts, responses):
    """A toy reward: the share of characters with an even code point."""
    return [sum(ord(c) % 2 == 0 for c in r) / max(1, len(r)) for r in responses]


def recompute_logprobs(engine, prompt, tokens):
    ids = engine.render(prompt)
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids + tokens])).logits[0].float()
    logp = logits[len(ids) - 1:-1].log_softmax(-1)
    return logp[torch.arange(len(tokens)), torch.tensor(tokens)]


def test_threshold_schedule_and_acceptance_formulas():
    # r0 = 0.5 * 1 + 0.5 * 5 = 3; rises linearly to r_star = 5 at n_max, then stays
    assert threshold(1.0, 5.0, 0.5, 0, 100) == pytest.approx(3.0)
    assert threshold(1.0, 5.0, 0.5, 50, 100) == pytest.approx(4.0)
    assert threshold(1.0, 5.0, 0.5, 100, 100) == pytest.approx(5.0)
    assert threshold(1.0, 5.0, 0.5, 150, 100) == pytest.approx(5.0)
    assert threshold(1.0, 5.0, 0.0, 0, 100) == pytest.approx(1.0)
    # anchored at the prefix: r(prefix) + the schedule's rise over the new tokens; r0 = 3, so 20/100 * 2
    assert relative_threshold(2.5, 30, 1.0, 5.0, 0.5, 50, 100) == pytest.approx(2.9)
    assert accept_probability(2.0, 1.0, 0.7) == 1.0
    assert accept_probability(1.0, 2.0, 0.7) == pytest.approx(math.exp(-1 / 0.7))
    assert accept_probability(1.0, 2.0, 0.7, "hard") == 0.0
    assert accept_probability(2.0, 2.0, 0.7, "hard") == 1.0
    assert calibrate([1.0, 3.0], 1.0) == pytest.approx((3.0, 1.0))
    assert calibrate([1.0, 2.0], 2.0) == pytest.approx((2.5, 0.5))
    assert calibrate([4.0, 4.0], 1.0) == (4.0, 1.0)  # no spread: beta stays in reward units


def test_cards_trace_follows_the_rules(engine):
    results = generate(["hi", "The answer is"], method="cards", model=engine, reward=even_share, max_new_tokens=40,
                       seed=3, tau_u=1.2, min_segment=3, max_segment=10, trace=True, r_star=0.5, beta=0.1)
    for result in results:
        stats = result.stats
        assert len(result.tokens) <= 40
        accepted = [e for e in result.trace if e["accepted"]]
        assert len(accepted) == stats["segments"] == len({e["segment"] for e in result.trace})
        assert sum(e["tokens"] for e in accepted) == len(result.tokens)
        assert stats["rejections"] == len(result.trace) - len(accepted)
        assert all(e["tokens"] <= 10 for e in result.trace)
        before = [sum(e["tokens"] for e in accepted[:i]) for i in range(len(accepted))]  # prefix per segment
        for entry in result.trace:
            assert entry["threshold"] == pytest.approx(
                threshold(stats["prompt_reward"], 0.5, 0.5, before[entry["segment"]] + entry["tokens"], 40))
            assert entry["p_accept"] == pytest.approx(accept_probability(entry["reward"], entry["threshold"], 0.1))
        assert result.reward == pytest.approx(even_share(None, [result.text])[0])


def test_args_reports_the_reward_as_the_reward_gave_it(engine):
    """ARGS kept its rewards in a float32 tensor: 0.1 came back as 0.10000000149, and a finite reward
    above float32's range as infinity (not JSON)."""
    for value in (0.1, 1e300):
        (result,) = generate("hi", method="args", model=engine, reward=lambda p, r: [value] * len(r),
                             max_new_tokens=3, k=3)
        assert result.reward == value


def test_calibration_refuses_rewards_too_large_to_average(engine):
    """Finite scores near the float maximum overflowed the calibration's mean: an unexpected
    OverflowError instead of a one-line error."""
    huge = lambda prompts, responses: [1e308 * (len(r) % 2) for r in responses]  # noqa: E731
    for method in ("rs", "cards"):
        with pytest.raises(DecalignError, match="rewards too large to calibrate r_star from"):
            generate("hi", method=method, model=engine, reward=huge, max_new_tokens=4, seed=0)


def test_calibrated_mode_measures_beta_in_reward_spread(engine):
    (result,) = generate("hi", method="cards", model=engine, reward=even_characters, max_new_tokens=20, seed=2,
                         tau_u=1.0, min_segment=4, temperature=2.0, top_k=0, trace=True, beta=0.5, margin=1.0)
    unit = result.stats["reward_unit"]
    assert 0 < unit < 0.5  # the spread of the first proposals' rewards, not the absolute default of 1
    for entry in result.trace:
        assert entry["p_accept"] == pytest.approx(accept_probability(entry["reward"], entry["threshold"], 0.5 * unit))


def test_prefix_anchor_tests_each_segment_against_its_prefix(engine):
    results = generate(["hi", "The answer is"], method="cards", model=engine, reward=even_share, max_new_tokens=30,
                       seed=5, tau_u=1.2, min_segment=3, max_segment=8, trace=True, r_star=0.6, beta=0.1,
                       anchor="prefix", acceptance="hard")
    for result in results:
        prefix_reward, tokens = None, 0
        for segment in range(result.stats["segments"]):
            entries = [e for e in result.trace if e["segment"] == segment]
            for entry in entries:
                if prefix_reward is not None:  # the first segment follows the paper's schedule
                    assert entry["threshold"] == pytest.approx(relative_threshold(
                        prefix_reward, tokens, result.stats["prompt_reward"], 0.6, 0.5, tokens + entry["tokens"], 30))
                if not entry["fallback"]:  # hard rule: a proposal passes exactly when it reaches the threshold
                    assert (entry["reward"] >= entry["threshold"]) == (entry["accepted"] and entry is entries[-1])
            (chosen,) = [e for e in entries if e["accepted"]]  # the passing one, or the best of a fallback
            prefix_reward, tokens = chosen["reward"], tokens + chosen["tokens"]
        assert tokens == len(result.tokens)


def test_rejected_segments_leave_no_trace_in_the_cache(engine):
    """The answer's log-probabilities, recorded while decoding, equal a fresh recompute of the answer."""
    (result,) = generate("hi", method="cards", model=engine, reward=even_share, max_new_tokens=30, seed=5,
                         tau_u=1.0, min_segment=2, max_segment=8, r_star=0.6, beta=0.05)
    assert result.stats["rejections"] > 0
    expected = recompute_logprobs(engine, "hi", result.tokens)
    assert torch.allclose(torch.tensor(result.logprobs), expected, atol=1e-4)


@pytest.mark.parametrize("proposals", [1, 4])
def test_fallback_takes_the_best_of_21(engine, monkeypatch, proposals):
    """With several slots the best attempt waits on its row, so falling back writes nothing back;
    with one slot it is cropped like the rest and rewritten in one forced pass."""
    forced = []
    original = Batch.force
    monkeypatch.setattr(Batch, "force", lambda self, segments: forced.append(len(segments)) or original(self, segments))
    (result,) = generate("hi", method="cards", model=engine, reward=even_share, max_new_tokens=12, seed=2,
                         segmentation="fixed", max_segment=4, r_star=100.0, acceptance="hard", trace=True,
                         proposals=proposals)
    assert (len(forced) > 0) == (proposals == 1)
    for segment in range(result.stats["segments"]):
        attempts = [e for e in result.trace if e["segment"] == segment]
        assert len(attempts) == 21 and attempts[-1]["fallback"]
        (chosen,) = [e for e in attempts if e["accepted"]]
        assert chosen["reward"] == max(e["reward"] for e in attempts)
    # the chosen attempts are the answer, restored from earlier rounds without leaking rejected text
    assert "".join(e["text"] for e in result.trace if e["accepted"]) == result.text
    assert torch.allclose(torch.tensor(result.logprobs), recompute_logprobs(engine, "hi", result.tokens), atol=1e-4)


def test_eos_and_length_limits(engine):
    results = generate(["hi", "bread", "The answer is"], method="cards", model=engine, reward=even_share,
                       max_new_tokens=9, seed=1, tau_u=0.5, min_segment=2, max_segment=64)
    for result in results:
        assert len(result.tokens) <= 9
        assert result.finish_reason in ("eos", "length")
        if result.finish_reason == "eos":
            assert result.tokens[-1] in engine.eos_ids
        else:
            assert len(result.tokens) == 9


@pytest.mark.parametrize("method, params", [
    ("cards", dict(tau_u=1.2, r_star=0.4, beta=0.2)),
    ("rs", dict(r_star=0.4, beta=0.2)),
    ("args", dict(k=5, mode="sample")),
])
def test_batched_prompts_equal_single_runs(engine, method, params):
    prompts = ["hi", "The answer is", "bread"]
    together = generate(prompts, method=method, model=engine, reward=even_share, max_new_tokens=16,
                        seed=[4, 5, 6], **params)
    for prompt, seed, result in zip(prompts, [4, 5, 6], together):
        (alone,) = generate(prompt, method=method, model=engine, reward=even_share, max_new_tokens=16, seed=[seed],
                            **params)
        assert alone.tokens == result.tokens


def chi_square_differs(first, second):
    """Two-sample chi-square on counts; True if the distributions differ at p < 0.001."""
    keys = sorted(set(first) | set(second))
    total_a, total_b = sum(first.values()), sum(second.values())
    bins, pending = [], [0, 0]
    for key in keys:  # merge sparse bins
        pending = [pending[0] + first.get(key, 0), pending[1] + second.get(key, 0)]
        if sum(pending) >= 10:
            bins.append(pending)
            pending = [0, 0]
    if sum(pending):
        bins[-1] = [bins[-1][0] + pending[0], bins[-1][1] + pending[1]]
    statistic = 0.0
    for a, b in bins:
        expected_a = (a + b) * total_a / (total_a + total_b)
        expected_b = (a + b) * total_b / (total_a + total_b)
        statistic += (a - expected_a) ** 2 / expected_a + (b - expected_b) ** 2 / expected_b
    return statistic > CHI2_001[min(len(bins) - 1, 10)]


def test_parallel_proposals_keep_the_sequential_distribution(engine):
    """K proposals tested in order give the same answer distribution as one at a time; and the test
    has power: it does tell rejection sampling from plain sampling."""
    common = dict(model=engine, reward=even_characters, max_new_tokens=6, batch_size=500, top_k=3, r_star=0.6,
                  beta=0.1, temperature=1.0)

    def outcomes(method, seed, **params):
        results = generate(["hi"] * 500, method=method, seed=seed, **common, **params)
        return Counter(round(even_characters(None, [r.text])[0] * 5) for r in results), results

    sequential, _ = outcomes("rs", 1, proposals=1)
    parallel, results = outcomes("rs", 2, proposals=5)
    assert sum(r.stats["rejections"] for r in results) > 200  # the threshold does reject
    assert not chi_square_differs(sequential, parallel), (sequential, parallel)
    plain = Counter(round(even_characters(None, [r.text])[0] * 5) for r in generate(
        ["hi"] * 500, method="sample", seed=3, model=engine, max_new_tokens=6, top_k=3, batch_size=500))
    assert chi_square_differs(sequential, plain)

    seg_seq, _ = outcomes("cards", 4, proposals=1, segmentation="fixed", min_segment=3, max_segment=3)
    seg_par, _ = outcomes("cards", 5, proposals=4, segmentation="fixed", min_segment=3, max_segment=3)
    assert not chi_square_differs(seg_seq, seg_par), (seg_seq, seg_par)
    # four slots of which one draws at a time: the same distribution again
    seg_one, _ = outcomes("cards", 6, proposals=4, parallel=1, segmentation="fixed", min_segment=3, max_segment=3)
    assert not chi_square_differs(seg_seq, seg_one), (seg_seq, seg_one)


@pytest.mark.parametrize("parallel", [None, 1, 2])
def test_parallel_bounds_the_slots_that_draw_at_once(engine, monkeypatch, parallel):
    """`parallel` caps the proposals in flight per prompt; with one at a time every token drawn
    belongs to an attempt that was tested (none is dropped unseen), where all four at once waste some."""
    from decalign.methods.rejection import RejectionSampler

    in_flight = []
    original = RejectionSampler.moves

    def moves(self):
        out = original(self)
        for state in self.states:
            in_flight.append(sum(1 for r in state.rows if not state.done and not self.slots[r][1].reason))
        return out

    monkeypatch.setattr(RejectionSampler, "moves", moves)
    prompts = ["hi", "bread", "The answer is"]
    results = generate(prompts, method="cards", model=engine, reward=even_share, max_new_tokens=24, seed=3,
                       tau_u=1.0, min_segment=2, max_segment=6, r_star=0.6, beta=0.05, trace=True, proposals=4,
                       parallel=parallel)
    assert max(in_flight) == (parallel or 4)
    assert sum(r.stats["rejections"] for r in results) > 0
    wasted = [r.stats["generated_tokens"] - sum(e["tokens"] for e in r.trace) for r in results]
    assert min(wasted) >= 0
    assert (max(wasted) == 0) == (parallel == 1), wasted
    for prompt, result in zip(prompts, results):  # rejected attempts left no trace in the answer
        assert torch.allclose(torch.tensor(result.logprobs), recompute_logprobs(engine, prompt, result.tokens), atol=1e-4)


def test_calibration_draws_all_slots_and_later_rounds_keep_only_what_they_need(engine, monkeypatch):
    """With parallel=1 the first K proposals (which calibrate r_star and are all scored before any
    is tested) draw at once; after that one slot draws and one holds the best attempt, and the
    other slots leave the prompt."""
    from decalign.methods.rejection import RejectionSampler

    seen = []  # per step and prompt: (calibrated, a segment accepted, slots drawing, slots kept)
    original = RejectionSampler.moves

    def moves(self):
        out = original(self)
        for state in self.states:
            if not state.done:
                drawing = sum(1 for r in state.rows if not self.slots[r][1].reason)
                seen.append((state.r_star is not None, bool(state.segments), drawing, len(state.rows)))
        return out

    monkeypatch.setattr(RejectionSampler, "moves", moves)
    results = generate(["hi", "bread"], method="cards", model=engine, reward=even_share, max_new_tokens=24, seed=3,
                       tau_u=1.0, min_segment=2, max_segment=6, beta=0.05, proposals=4, parallel=1)
    assert max(d for calibrated, _, d, _ in seen if not calibrated) == 4
    assert max(d for calibrated, _, d, _ in seen if calibrated) == 1
    assert {k for _, accepted, _, k in seen if accepted} == {2}
    assert sum(r.stats["segments"] for r in results) > 2
    for prompt, result in zip(["hi", "bread"], results):
        assert torch.allclose(torch.tensor(result.logprobs), recompute_logprobs(engine, prompt, result.tokens), atol=1e-4)


def test_rs_accepts_whole_answers(engine):
    results = generate(["hi", "bread"], method="rs", model=engine, reward=even_share, max_new_tokens=10, seed=1,
                       r_star=0.5, beta=0.05, trace=True)
    for result in results:
        assert result.stats["segments"] == 1
        (accepted,) = [e for e in result.trace if e["accepted"]]
        assert accepted["text"] == result.text
        assert all(e["threshold"] == 0.5 for e in result.trace)


def test_args_greedy_picks_logprob_plus_weighted_reward(engine):
    (result,) = generate("hi", method="args", model=engine, reward=even_share, max_new_tokens=5, k=4, w=2.0)
    prompt = engine.render("hi")
    tokens: list[int] = []
    for _ in range(5):
        with torch.no_grad():
            logp = engine.model(torch.tensor([prompt + tokens])).logits[0, -1].float().log_softmax(-1)
        top = logp.topk(4)
        scores = [float(lp) + 2.0 * even_share(None, [engine.decode(tokens + [int(t)])])[0]
                  for lp, t in zip(top.values, top.indices)]
        tokens.append(int(top.indices[scores.index(max(scores))]))
        if tokens[-1] in engine.eos_ids:
            break
    assert result.tokens == tokens
    assert result.stats["reward_calls"] == 4 * len(tokens)
    assert result.reward == pytest.approx(even_share(None, [result.text])[0])


@pytest.mark.parametrize("params, message", [
    (dict(method="cards", alpha=1.5), "alpha must be in"),
    (dict(method="cards", beta=0), "beta must be > 0"),
    (dict(method="cards", tau_u=-1), "tau_u must be >= 0"),
    (dict(method="cards", min_segment=10, max_segment=5), "min_segment <= max_segment"),
    (dict(method="cards", segmentation="words"), "segmentation must be one of"),
    (dict(method="cards", anchor="answer"), "anchor must be prompt or prefix"),
    (dict(method="rs", beta=-1), "beta must be > 0"),
    (dict(method="args", mode="best"), "mode must be greedy or sample"),
])
def test_bad_parameters(engine, params, message):
    with pytest.raises(DecalignError, match=message):
        generate("hi", model=engine, reward=even_share, max_new_tokens=4, **params)


@pytest.mark.parametrize("method", ["cards", "rs", "args"])
def test_reward_is_required(engine, method):
    with pytest.raises(DecalignError, match="needs a reward"):
        generate("hi", method=method, model=engine, max_new_tokens=4)


def test_a_value_switches_the_unset_parameters_to_the_value_mode():
    from decalign.methods.base import make_config
    from decalign.methods.cards import PAPER_MODE, VALUE_MODE

    paper, valued = make_config("cards", {}), make_config("cards", {"value": "harmless"})
    assert {name: getattr(paper, name) for name in PAPER_MODE} == PAPER_MODE and paper.sampling.temperature == 0.7
    assert {name: getattr(valued, name) for name in VALUE_MODE} == VALUE_MODE
    given = make_config("cards", {"value": "harmless", "anchor": "prompt", "top_k": "5", "max_retries": "20"})
    assert (given.anchor, given.top_k, given.max_retries, given.acceptance) == ("prompt", 5, 20, "hard")
