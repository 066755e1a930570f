"""Exactness of the engine: the cache, batching, forking and cropping change nothing a row sees."""

import math

import pytest
import torch

from decalign import DecalignError, EntropyStop
from decalign.engine import BatchPrompt, use_packed_linears
from decalign.sampling import GREEDY, Sampling

SAMPLE = Sampling(temperature=1.0)


@pytest.fixture(autouse=True)
def room_never_read(monkeypatch):
    """The cache's room is allocated uninitialised; here it is NaN, so that a read of any position
    not written first (a hole, a pad, room after a fork, a compaction or a join) would show in
    every exactness test of this file."""
    from decalign.engine import cache as cache_module

    monkeypatch.setattr(cache_module, "new_buffer", lambda like, shape: like.new_full(shape, math.nan))


@pytest.fixture(scope="module", params=["torch matmul", "packed weights", "fed rows alone", "transformers' forward",
                                        "sliding window"])
def engine(request, tiny_path, tmp_path_factory):
    """Every exactness test runs five times: with torch's own matmul; with every Linear layer of
    the tiny model packed for oneDNN (the real model's large layers are; the tiny ones would not
    be); with every decode step run over the rows that take a token only; through transformers' own
    forward instead of the engine's decoder; and on a model whose second layer attends to its last
    5 tokens only (transformers' forward, the window applied by the engine's masks in token positions)."""
    from decalign import Engine
    from decalign.testing import make_tiny_model

    if request.param == "sliding window":
        engine = Engine.load(str(make_tiny_model(tmp_path_factory.mktemp("sliding") / "model", sliding_window=5)))
        assert engine.decoder is None and engine.windows == {"full_attention": None, "sliding_attention": 5}
        return engine
    engine = Engine.load(str(tiny_path))
    assert engine.decoder is not None
    if request.param == "transformers' forward":
        engine.decoder = None
    if request.param == "packed weights":
        assert use_packed_linears(engine.model, min_weights=0) > 0
    if request.param == "fed rows alone":
        engine.subset_share = 2.0
    return engine


@pytest.fixture(scope="module")
def prompts(engine, prompt_texts):
    return [engine.render(t) for t in prompt_texts]


def full_logprobs(engine, prompt, tokens):
    """Log-softmax at every generated position, by one uncached forward over the whole row."""
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        logits = engine.model(ids).logits[0].float()
    return logits[len(prompt) - 1:].log_softmax(-1)  # row j predicts token j; the last one is next


def assert_row_matches_recompute(engine, batch, row, prompt):
    tokens = batch.tokens[row]
    reference = full_logprobs(engine, prompt, tokens)
    recorded = torch.tensor(batch.logprobs[row])
    expected = reference[torch.arange(len(tokens)), torch.tensor(tokens)]
    assert torch.allclose(recorded, expected, atol=1e-4), (recorded - expected).abs().max()
    if batch.finish[row] is None:  # live rows also hold the right next-token logits
        assert torch.allclose(batch.logits[row].log_softmax(-1), reference[-1], atol=1e-4)


def test_cached_decoding_equals_full_recompute(engine, prompts):
    batch = engine.start(prompts, n=2, seeds=[1, 2, 3], max_new_tokens=24)
    batch.extend(SAMPLE, max_tokens=9)
    batch.extend(SAMPLE, stop_rule=EntropyStop(threshold=1.0, min_tokens=2))  # rows idle at different steps
    for row in range(batch.size):
        assert_row_matches_recompute(engine, batch, row, prompts[batch.prompt_of[row]])


def test_a_step_over_the_fed_rows_alone_equals_a_step_over_all(tiny_path, prompt_texts, monkeypatch):
    """Idle rows skipped in a decode step change nothing: same tokens, log-probabilities, hidden
    states and next-token logits as steps over every row, also when the cache's spare room runs out
    every few steps (no room reserved up front); and the skipping does happen."""
    from decalign import Engine
    from decalign.engine import batch as batch_module, cache as cache_module

    monkeypatch.setattr(cache_module, "spare_positions", lambda filled: 3)
    monkeypatch.setattr(batch_module, "reserve_room", lambda cache, positions: None)
    engine = Engine.load(str(tiny_path))
    prompts = [engine.render(t) for t in prompt_texts]
    subset_steps = []
    only_rows = batch_module.only_rows
    monkeypatch.setattr(batch_module, "only_rows", lambda cache, rows: subset_steps.append(len(rows)) or only_rows(cache, rows))
    runs = []
    for share in (0.0, 1.0):
        engine.subset_share = share
        batch = engine.start(prompts, n=2, seeds=[1, 2, 3], max_new_tokens=40, state_layers=[1, 2])
        batch.extend(SAMPLE, max_tokens=9)
        batch.extend(SAMPLE, stop_rule=EntropyStop(threshold=1.0, min_tokens=2))  # rows idle at different steps
        batch.extend(SAMPLE, max_tokens=12)
        runs.append(batch)
        if share == 0.0:
            assert not subset_steps
    assert subset_steps and min(subset_steps) < runs[1].size  # some steps ran part of the batch
    every, fed = runs
    assert fed.tokens == every.tokens
    for row in range(fed.size):
        assert torch.allclose(torch.tensor(fed.logprobs[row]), torch.tensor(every.logprobs[row]), atol=1e-5)
        assert_row_matches_recompute(engine, fed, row, prompts[fed.prompt_of[row]])
    live = fed.live_rows()
    assert torch.allclose(fed.logits[live], every.logits[live], atol=1e-4)
    assert torch.allclose(fed.state_means(range(fed.size)), every.state_means(range(fed.size)), atol=1e-5)
    assert torch.allclose(fed.last_states(range(fed.size)), every.last_states(range(fed.size)), atol=1e-5)


def test_batched_greedy_equals_each_prompt_alone(engine, prompts):
    together = engine.start(prompts, max_new_tokens=20)
    together.extend(GREEDY)
    for p, prompt in enumerate(prompts):
        alone = engine.start([prompt], max_new_tokens=20)
        alone.extend(GREEDY)
        assert together.tokens[p] == alone.tokens[0]
        assert torch.allclose(torch.tensor(together.logprobs[p]), torch.tensor(alone.logprobs[0]), atol=1e-4)


def test_batched_sampling_equals_each_prompt_alone(engine, prompts):
    """Per-row generators: a row's sample does not depend on its batch neighbours."""
    together = engine.start(prompts, n=3, seeds=[7, 8, 9], max_new_tokens=16)
    together.extend(SAMPLE)
    for p, prompt in enumerate(prompts):
        alone = engine.start([prompt], n=3, seeds=[7 + p], max_new_tokens=16)
        alone.extend(SAMPLE)
        assert [together.tokens[3 * p + c] for c in range(3)] == alone.tokens


@pytest.mark.parametrize("cut", ["segment_start", "mid_segment"])
def test_crop_then_extend_equals_fresh_extend(engine, prompts, cut):
    batch = engine.start(prompts, seeds=[4, 5, 6], max_new_tokens=30)
    batch.extend(SAMPLE, max_tokens=5)
    kept = [list(t) for t in batch.tokens]
    batch.extend(SAMPLE, max_tokens=8)  # the segment that gets rejected
    lengths = [len(k) if cut == "segment_start" else len(k) - 2 for k in kept]
    batch.crop(range(batch.size), lengths)
    for row, length in enumerate(lengths):
        assert batch.tokens[row] == kept[row][:length]
        assert int(batch.mask[row].sum()) == len(prompts[row]) + length  # rejected tokens left the cache
    batch.extend(GREEDY, max_tokens=8)
    for row, length in enumerate(lengths):
        fresh = engine.start([prompts[row] + kept[row][:length]], max_new_tokens=8)
        fresh.extend(GREEDY)
        assert batch.tokens[row][length:] == fresh.tokens[0]
        assert_row_matches_recompute(engine, batch, row, prompts[row])


def test_crop_reuses_the_prefix(engine, prompts):
    """Cropping to a segment start costs no forward pass; mid-segment costs one token, not the prefix."""
    batch = engine.start(prompts[:1], seeds=[1], max_new_tokens=30)
    batch.extend(SAMPLE, max_tokens=6)
    batch.extend(SAMPLE, max_tokens=6)
    work = batch.work[0]
    before = (work.forward_passes, work.decode_tokens, work.prefill_tokens)
    batch.crop([0], [6])
    assert (work.forward_passes, work.decode_tokens, work.prefill_tokens) == before
    batch.crop([0], [3])
    assert (work.forward_passes, work.decode_tokens, work.prefill_tokens) == (before[0] + 1, before[1] + 1, before[2])


def test_select_forks_independent_rows(engine, prompts):
    batch = engine.start(prompts[:2], seeds=[1, 2], max_new_tokens=20)
    batch.extend(SAMPLE, max_tokens=4)
    prefix = [list(t) for t in batch.tokens]
    batch.select([1, 0, 0, 0])
    assert batch.prompt_of == [1, 0, 0, 0]
    batch.extend(SAMPLE)
    assert all(batch.tokens[r][:4] == prefix[0] for r in (1, 2, 3))
    assert len({tuple(batch.tokens[r]) for r in (1, 2, 3)}) > 1  # copies draw their own randomness
    for row in range(batch.size):
        assert_row_matches_recompute(engine, batch, row, prompts[batch.prompt_of[row]])


def test_copy_row_makes_exact_copies_in_place(engine, prompts):
    """A copied row continues exactly as its source would (cache, mask, logits), keeps its number
    and its own random stream; the rows it did not touch are unchanged."""
    batch = engine.start(prompts, seeds=[1, 2, 3], max_new_tokens=20)
    batch.extend(SAMPLE, max_tokens=5)
    untouched = list(batch.tokens[1])
    batch.copy_row(2, [0])
    assert batch.tokens[0] == batch.tokens[2] and batch.prompt_of == [0, 1, 2]
    assert torch.equal(batch.logits[0], batch.logits[2])
    batch.extend(SAMPLE)
    assert batch.tokens[1][:5] == untouched
    assert batch.tokens[0][:5] == batch.tokens[2][:5] and batch.tokens[0] != batch.tokens[2]
    # row 0 now holds prompt 2's text: its log-probabilities equal a recompute of that text
    assert_row_matches_recompute(engine, batch, 0, prompts[2])
    assert_row_matches_recompute(engine, batch, 2, prompts[2])


def test_same_seed_same_tokens(engine, prompts):
    runs = []
    for seed in (11, 11, 12):
        batch = engine.start(prompts, seeds=[seed] * 3, max_new_tokens=16)
        batch.extend(SAMPLE)
        runs.append(batch.tokens)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_entropy_stop_rule_cuts_before_uncertain_tokens(engine, prompts):
    rule = EntropyStop(threshold=1.2, min_tokens=3)
    batch = engine.start(prompts, n=4, seeds=[1, 2, 3], max_new_tokens=64)
    segments = batch.extend(SAMPLE, stop_rule=rule, max_tokens=20)
    reasons = {s.reason for s in segments}
    assert "rule" in reasons
    for segment in segments:
        assert 1 <= len(segment.tokens) <= 20
        # every token after the first min_tokens was sampled at an entropy below the threshold
        assert all(h < 1.2 for h in segment.entropies[3:])
        if segment.reason == "rule":
            assert len(segment.tokens) >= 3
            logp = batch.logits[segment.row].log_softmax(-1)
            assert -(logp.exp() * logp).sum() >= 1.2  # the token it stopped before is uncertain
        if segment.reason == "segment":
            assert len(segment.tokens) == 20


def test_max_new_tokens_and_min_new_tokens(engine, prompts):
    batch = engine.start(prompts, max_new_tokens=7, min_new_tokens=7)
    segments = batch.extend(SAMPLE)
    assert all(len(t) == 7 for t in batch.tokens)
    assert all(s.reason == "length" for s in segments)
    assert not any(tok in engine.eos_ids for t in batch.tokens for tok in t)


def test_eos_finishes_a_row_and_crop_revives_it(engine, prompts):
    batch = engine.start(prompts[:2], max_new_tokens=10)
    eos = min(engine.eos_ids)
    first = int(batch.next_logits([1]).argmax())
    reasons = batch.append({0: eos, 1: first})
    assert reasons == {0: "eos", 1: None}
    assert batch.finish[0] == "eos" and batch.live_rows() == [1]
    with pytest.raises(DecalignError):
        batch.append({0: first})
    batch.crop([0], [0])
    assert batch.live_rows() == [0, 1]
    batch.extend(GREEDY, rows=[0], max_tokens=3)
    assert_row_matches_recompute(engine, batch, 0, prompts[0])


def test_stop_string_ends_row_and_is_cut_from_text(engine, prompts):
    probe = engine.start(prompts[:1], max_new_tokens=12)
    probe.extend(GREEDY)
    stop = engine.decode(probe.tokens[0][3:5])
    assert stop.strip()
    batch = engine.start(prompts[:1], max_new_tokens=12, stop_strings=[stop])
    (segment,) = batch.extend(GREEDY)
    assert segment.reason == "stop"
    assert stop not in batch.text(0)
    assert len(batch.tokens[0]) <= 5


def test_min_new_tokens_holds_off_stop_strings_ending_before_it(engine, prompts):
    """As vLLM's min_tokens: a stop string that ends before the min_new_tokens-th token neither ends
    the row nor cuts its text; one that ends at or after it does both."""
    probe = engine.start(prompts[:1], max_new_tokens=12)
    probe.extend(GREEDY)
    early = engine.decode(probe.tokens[0][1:3])  # ends in token 3
    assert early.strip() and early not in engine.decode(probe.tokens[0][:2])
    held = engine.start(prompts[:1], max_new_tokens=12, min_new_tokens=4, stop_strings=[early])
    (segment,) = held.extend(GREEDY)
    assert held.tokens[0] == probe.tokens[0][:len(held.tokens[0])]  # greedy: the same answer
    assert len(held.tokens[0]) > 3 and held.text(0).startswith(engine.decode(probe.tokens[0][:3]))
    at_min = engine.start(prompts[:1], max_new_tokens=12, min_new_tokens=3, stop_strings=[early])
    (segment,) = at_min.extend(GREEDY)
    assert segment.reason == "stop" and len(at_min.tokens[0]) == 3 and early not in at_min.text(0)


def test_prompt_longer_than_context_is_refused(engine):
    with pytest.raises(DecalignError, match="context"):
        engine.start([[5] * engine.context_length], max_new_tokens=4)


def test_choose_tokens_follows_the_distribution():
    """Inverse-CDF draws with per-row generators sample softmax(logits / T), restricted by top-k / top-p."""
    from decalign.sampling import choose_tokens, make_generator

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    draws = 6000
    rows = logits.expand(draws, -1)
    gens = [make_generator(i) for i in range(draws)]

    def frequencies(sampling):
        tokens = choose_tokens(rows, sampling, gens)
        return torch.bincount(tokens, minlength=6).float() / draws

    for sampling, probs in [
        (Sampling(1.0), logits.softmax(-1)),
        (Sampling(0.5), (logits / 0.5).softmax(-1)),
        (Sampling(1.0, top_k=2), torch.cat([logits[:2].softmax(-1), torch.zeros(4)])),
        # top_p=0.8: tokens 0,1 hold 0.79 < 0.8, so token 2 joins the nucleus
        (Sampling(1.0, top_p=0.8), torch.cat([logits[:3].softmax(-1), torch.zeros(3)])),
    ]:
        observed = frequencies(sampling)
        sigma = (probs * (1 - probs) / draws).sqrt()
        assert torch.all((observed - probs).abs() <= 5 * sigma + 1e-9), (sampling, observed, probs)
        assert torch.all(observed[probs == 0] == 0)


def test_choose_tokens_keeps_a_long_tail_of_tiny_probabilities():
    """1% of the mass spread over 50k tokens (each 2e-7, below float32's step of 1.2e-7 at 1) is
    drawn 1% of the time: the draw's running sum must keep increments that small."""
    from decalign.sampling import choose_tokens, make_generator

    tail = 50_000
    probs = torch.cat([torch.tensor([0.6, 0.39]), torch.full((tail,), 0.01 / tail)])
    draws = 6000
    tokens = choose_tokens(probs.log().expand(draws, -1), Sampling(1.0), [make_generator(i) for i in range(draws)])
    share = (tokens >= 2).float().mean().item()
    assert abs(share - 0.01) <= 5 * (0.01 * 0.99 / draws) ** 0.5, share


def test_logprobs_are_log_probabilities(engine, prompts):
    batch = engine.start(prompts[:1], seeds=[3], max_new_tokens=10)
    (segment,) = batch.extend(SAMPLE)
    assert all(lp <= 0 and math.isfinite(lp) for lp in segment.logprobs)
    assert all(0 <= h <= math.log(len(engine.tokenizer)) + 1e-4 for h in segment.entropies)


def test_punctuation_cut_and_max_prob_rules(engine, prompts):
    from decalign.engine import MaxProbStop, PunctuationCut

    cut = PunctuationCut(min_entropy=0.0, min_tokens=2, marks="e")
    batch = engine.start(prompts, n=3, seeds=[1, 2, 3], max_new_tokens=40)
    for segment in batch.extend(SAMPLE, cut_rule=cut, max_tokens=30):
        texts = [engine.decode([t]) for t in segment.tokens]
        if segment.reason == "rule":
            assert len(texts) >= 2 and "e" in texts[-1]
        assert not any("e" in t for t in texts[1:-1])  # no earlier token qualified
    stop = MaxProbStop(threshold=0.6, min_tokens=2)
    batch = engine.start(prompts, n=3, seeds=[1, 2, 3], max_new_tokens=40)
    for segment in batch.extend(SAMPLE, stop_rule=stop, max_tokens=30):
        if segment.reason == "rule":
            assert 1 - float(batch.logits[segment.row].softmax(-1).max()) >= 0.6


def test_force_rewrites_an_earlier_segment_exactly(engine, prompts):
    """A rejected-then-restored segment (best-of fallback) leaves the row as if it had been kept."""
    batch = engine.start(prompts, seeds=[1, 2, 3], max_new_tokens=30)
    batch.extend(SAMPLE, max_tokens=4)
    starts = [len(t) for t in batch.tokens]
    segments = batch.extend(SAMPLE, max_tokens=7)
    kept = [list(t) for t in batch.tokens]
    batch.crop(range(batch.size), starts)
    generated = [w.generated_tokens for w in batch.work]
    batch.force({s.row: s for s in segments})
    assert batch.tokens == kept
    assert [w.generated_tokens for w in batch.work] == generated  # not counted twice
    for row in range(batch.size):
        assert_row_matches_recompute(engine, batch, row, prompts[row])
    batch.extend(GREEDY, max_tokens=3)
    for row in range(batch.size):
        assert_row_matches_recompute(engine, batch, row, prompts[row])


@pytest.mark.parametrize("join", ["admitted at once", "in the next step's pass"])
def test_admitted_prompts_join_a_running_batch_exactly(engine, prompts, join, monkeypatch):
    """Continuous batching: prompts admitted into a batch that has already written tokens decode as
    they do alone (cache, logits, random streams), the rows already there are not disturbed, and
    hidden states are kept for the union of both sides' layers; whether they are encoded in a pass
    of their own or beside the running rows' next tokens in one pass of the engine's decoder."""
    from decalign.engine.batch import Sample

    running = engine.start([prompts[0]], n=2, seeds=[5], max_new_tokens=20, state_layers=[1])
    running.extend(SAMPLE, max_tokens=7)
    joining = [BatchPrompt(ids=prompts[1], seed=6, rows=2, max_new_tokens=12, state_layers=(2,)),
               BatchPrompt(ids=prompts[2], seed=7, max_new_tokens=12)]
    if join == "admitted at once":
        first = running.admit(joining)
    else:
        passes = []
        if engine.decoder is not None:  # one pass of two parts: the running rows' and the joiners'
            run = engine.decoder.run
            monkeypatch.setattr(engine.decoder, "run", lambda parts: passes.append(len(parts)) or run(parts))
        first = running.advance([Sample(running.open_segments(running.live_rows()), SAMPLE)],
                                joining=running.prepare_join(joining))
        monkeypatch.undo()
        assert passes == ([2] if engine.decoder is not None else [])
    assert first == 2 and running.prompt_of == [0, 0, 1, 1, 2] and running.state_layers == (1, 2)
    running.extend(SAMPLE)
    for seed, prompt, rows, n, limit, layers in ((5, prompts[0], [0, 1], 2, 20, [1]), (6, prompts[1], [2, 3], 2, 12, [2]),
                                                 (7, prompts[2], [4], 1, 12, [])):
        alone = engine.start([prompt], n=n, seeds=[seed], max_new_tokens=limit, state_layers=layers)
        alone.extend(SAMPLE)
        assert [running.tokens[r] for r in rows] == alone.tokens
        for row in rows:
            assert_row_matches_recompute(engine, running, row, prompt)
        if layers:
            assert torch.allclose(running.state_means(rows, layers), alone.state_means([0, 1][:n], layers), atol=1e-5)
            assert torch.allclose(running.last_states(rows, layers), alone.last_states([0, 1][:n], layers), atol=1e-5)


def test_a_join_after_the_longest_answer_left_keeps_every_rows_states(engine, prompts):
    """Rows that joined a batch keep their hidden states exactly, also after the prompt whose
    answers were the longest has left (the tracked states stay as wide as that prompt made them;
    a join used to size them by the prompts left and fail)."""
    batch = engine.open([BatchPrompt(ids=prompts[0], seed=1, max_new_tokens=40, state_layers=(1,)),
                         BatchPrompt(ids=prompts[1], seed=2, max_new_tokens=20, state_layers=(1,))])
    batch.extend(SAMPLE, max_tokens=3)
    batch.select([1])
    batch.keep_prompts([1])
    batch.admit([BatchPrompt(ids=prompts[2], seed=3, max_new_tokens=10, state_layers=(1,))])
    batch.extend(SAMPLE)
    alone = engine.start([prompts[2]], seeds=[3], max_new_tokens=10, state_layers=[1])
    alone.extend(SAMPLE)
    assert batch.tokens[1] == alone.tokens[0]
    assert torch.allclose(batch.state_means([1]), alone.state_means([0]), atol=1e-5)
    assert torch.allclose(batch.last_states([1]), alone.last_states([0]), atol=1e-5)
    assert_row_matches_recompute(engine, batch, 0, prompts[1])


def test_packed_layers_meet_few_row_counts(monkeypatch):
    """A packed layer rounds the rows it computes up to a few counts (exact up to 16, then 8 per
    doubling, at most 12.5% more): oneDNN keeps a compiled kernel per shape, and a busy server meets
    a new row count at almost every join and every finished row. The rounding changes no number."""
    from decalign.engine.adapters import packed_rows

    for rows in range(1, 4097):
        padded = packed_rows(rows)
        assert padded >= rows and padded - rows <= rows / 8 and packed_rows(padded) == padded
    assert [packed_rows(r) for r in range(1, 17)] == list(range(1, 17))
    assert len({packed_rows(r) for r in range(17, 4097)}) == 8 * 8
    torch.manual_seed(0)
    layer, reference = torch.nn.Linear(512, 640), torch.nn.Linear(512, 640)
    reference.load_state_dict(layer.state_dict())
    assert use_packed_linears(layer) == 1
    seen = []
    packed = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda x, *a: seen.append(x.shape[0]) or packed(x, *a))
    with torch.no_grad():
        for rows in range(2, 70):
            x = torch.randn(rows, 512)
            assert torch.allclose(layer(x), reference(x), atol=1e-4)
        x = torch.randn(1, 23, 512)  # a shared pass: every token on one axis
        assert layer(x).shape == (1, 23, 640) and torch.allclose(layer(x), reference(x), atol=1e-4)
    assert len(set(seen)) == 15 + 8 + 8 + 1 and set(seen) >= {24, 72}  # 2-16, to 32, to 64, 72


def test_rows_join_and_leave_in_place_once_a_batch_has_grown(engine, prompts):
    """A batch's first join gives its cache rows to spare; a later join is written into them, and a
    selection that keeps the first rows where they are moves only the rows after them: no new
    buffer, no copy of the whole cache (a busy server's joins and leaves), and every row still
    decodes exactly."""
    batch = engine.start([prompts[1]], n=2, seeds=[1], max_new_tokens=30)
    batch.extend(SAMPLE, max_tokens=6)
    batch.admit([BatchPrompt(ids=prompts[0], seed=2, max_new_tokens=30)])
    layers = [layer for layer in batch.cache.layers]
    assert all(layer.row_capacity > batch.size for layer in layers)
    buffers = [layer._buffers[name].data_ptr() for layer in layers for name in ("keys", "values")]
    batch.extend(SAMPLE, max_tokens=6)
    batch.admit([BatchPrompt(ids=prompts[2], seed=3, max_new_tokens=30)])
    batch.extend(SAMPLE, max_tokens=2)
    batch.select([0, 2, 3])  # the second row leaves: the two after it move up
    assert [layer._buffers[name].data_ptr() for layer in layers for name in ("keys", "values")] == buffers
    batch.extend(SAMPLE)
    for row, prompt in enumerate([prompts[1], prompts[0], prompts[2]]):
        assert_row_matches_recompute(engine, batch, row, prompt)
    alone = engine.start([prompts[2]], seeds=[3], max_new_tokens=30)
    alone.extend(SAMPLE)
    assert batch.tokens[2] == alone.tokens[0]


@pytest.mark.parametrize("shape", [(1, 512), (2, 512), (3, 5, 512), (40, 512)])
def test_packed_linear_gives_torch_numbers(shape):
    torch.manual_seed(0)
    layer = torch.nn.Linear(512, 640)
    reference = torch.nn.Linear(512, 640)
    reference.load_state_dict(layer.state_dict())
    assert use_packed_linears(layer) == 1
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.allclose(layer(x), reference(x), atol=1e-4)
        layer.weight.mul_(2)  # an in-place edit of the weight is seen: the layer repacks
        reference.weight.mul_(2)
        assert torch.allclose(layer(x), reference(x), atol=1e-4)
    x.requires_grad_(True)  # with autograd on, torch's own matmul runs and gradients flow
    layer(x).sum().backward()
    assert torch.allclose(x.grad, reference.weight.sum(0).expand_as(x), atol=1e-4)


def test_small_layers_stay_unpacked():
    assert use_packed_linears(torch.nn.Linear(64, 64)) == 0


def tiny_causal_lm(kind: str, dtype=torch.float32):
    """(model, tokenizer) of a random 2-layer causal LM of the given architecture."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    from decalign.testing import make_tokenizer

    tokenizer = make_tokenizer()
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = {
        "llama": lambda: LlamaConfig(**shape),
        "llama3 rope": lambda: LlamaConfig(**shape, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                  "original_max_position_embeddings": 64}),
        "qwen2": lambda: Qwen2Config(**shape),  # biases on q, k, v
        "mistral": lambda: MistralConfig(**shape, sliding_window=None),
        "mistral, sliding window": lambda: MistralConfig(**shape, sliding_window=8),
        "llama, gelu": lambda: LlamaConfig(**shape, hidden_act="gelu"),
    }[kind]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():  # biases are zero at init: give them something to do
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.5)
    return model, tokenizer


@pytest.mark.parametrize("kind", ["llama", "llama3 rope", "qwen2", "mistral"])
def test_the_engines_decoder_equals_transformers_forward(kind, prompt_texts):
    """The engine's own decode forward gives transformers' logits and hidden states: left-padded
    prompts, sampled steps, steps over some rows only, every tracked layer (embeddings to the normed
    output)."""
    from decalign import Engine

    model, tokenizer = tiny_causal_lm(kind)
    runs = []
    for lean in (True, False):
        engine = Engine(model, tokenizer)
        assert engine.decoder is not None
        if not lean:
            engine.decoder = None
        engine.subset_share = 0.9
        prompts = [engine.render(t) for t in prompt_texts]
        batch = engine.start(prompts, n=2, seeds=[1, 2, 3], max_new_tokens=30, state_layers=[0, 1, 2])
        batch.extend(SAMPLE, max_tokens=6)
        batch.extend(SAMPLE, stop_rule=EntropyStop(threshold=1.0, min_tokens=2))  # idle rows: subset steps
        batch.extend(SAMPLE, max_tokens=6)
        runs.append(batch)
    mine, theirs = runs
    assert mine.tokens == theirs.tokens
    for row in range(mine.size):
        assert torch.allclose(torch.tensor(mine.logprobs[row]), torch.tensor(theirs.logprobs[row]), atol=1e-5)
    live = mine.live_rows()
    assert torch.allclose(mine.logits[live], theirs.logits[live], atol=1e-4)
    rows = range(mine.size)
    assert torch.allclose(mine.state_means(rows), theirs.state_means(rows), atol=1e-5)
    assert torch.allclose(mine.last_states(rows), theirs.last_states(rows), atol=1e-5)


def test_the_decoder_in_bfloat16_rounds_as_transformers_does(prompt_texts):
    """On a GPU the engine runs in bfloat16: with left-padded prompts (padding positions that may
    read nothing) the decoder's logits and states stay finite and within bfloat16's rounding of
    transformers' (here on the CPU)."""
    from decalign import Engine

    model, tokenizer = tiny_causal_lm("llama", torch.bfloat16)
    batches = []
    for lean in (True, False):
        engine = Engine(model, tokenizer)
        if not lean:
            engine.decoder = None
        batch = engine.start([engine.render(t) for t in prompt_texts], max_new_tokens=8, state_layers=[1, 2])
        batch.extend(GREEDY, max_tokens=4)
        batches.append(batch)
    mine, theirs = batches
    assert torch.isfinite(mine.logits).all() and torch.isfinite(mine.state_means(range(mine.size))).all()
    assert (mine.logits - theirs.logits).abs().max() < 0.1
    assert (mine.state_means(range(3)).float() - theirs.state_means(range(3)).float()).abs().max() < 0.1


@pytest.mark.parametrize("lean", [True, False], ids=["engine's decoder", "transformers' forward"])
def test_every_forward_pass_keeps_cudnn_attention_out(lean, prompt_texts, monkeypatch):
    """cuDNN's attention plans each new shape (a decode step's keys are one wider each step): every
    attention call of the engine's passes (prefill, decode steps, a join, teacher-forced logprobs and
    value features) runs with it off, and the caller's setting is back afterwards."""
    from decalign import Engine
    from decalign.values import teacher_forced_features

    model, tokenizer = tiny_causal_lm("llama")
    engine = Engine(model, tokenizer)
    if not lean:
        engine.decoder = None
    seen: list[bool] = []
    attention = torch.nn.functional.scaled_dot_product_attention

    def recorded(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return attention(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    prompts = [engine.render(t) for t in prompt_texts]
    batch = engine.start(prompts[:2], max_new_tokens=8)
    batch.extend(SAMPLE, max_tokens=3)
    batch.admit([BatchPrompt(ids=prompts[2], seed=5, max_new_tokens=8)])
    batch.extend(SAMPLE, max_tokens=3)
    engine.top_tokens(prompts[0], batch.tokens[0], k=2)
    teacher_forced_features(engine, prompts[0], [batch.tokens[0]], [1, 2], [[2]])
    assert len(seen) > 10 and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    monkeypatch.setenv("DECALIGN_CUDNN_ATTENTION", "1")  # PyTorch's own choice, for side-by-side timings
    engine.top_tokens(prompts[0], batch.tokens[0], k=2)
    assert seen[-1]


@pytest.mark.parametrize("kind", ["mistral, sliding window", "llama, gelu"])
def test_the_decoder_leaves_architectures_it_does_not_reproduce_to_transformers(kind, monkeypatch):
    from decalign.engine.decoder import Decoder

    model, _ = tiny_causal_lm(kind)
    assert Decoder.build(model) is None
    llama, _ = tiny_causal_lm("llama")
    assert Decoder.build(llama) is not None
    monkeypatch.setenv("DECALIGN_LEAN_DECODER", "0")
    assert Decoder.build(llama) is None


def test_a_model_whose_cache_holds_more_than_keys_and_values_is_refused_at_load(tmp_path):
    """A recurrent model (Mamba) cannot be cropped, forked or joined as the engine does: one clear
    error when it loads, not wrong answers (greedy went astray from its second token) or a traceback."""
    from transformers import MambaConfig, MambaForCausalLM

    from decalign import Engine
    from decalign.errors import DecalignError
    from decalign.testing import make_tokenizer

    tokenizer = make_tokenizer()
    MambaForCausalLM(MambaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, state_size=4)
                     ).save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(DecalignError, match="recurrent"):
        Engine.load(str(tmp_path))


def test_a_prompt_s_roles_are_those_a_chat_template_knows():
    """A chat template writes whatever role it is given, so a typo would silently become a turn of
    its own; OpenAI's "developer" message is the system message."""
    from decalign.engine import validate_messages

    assert validate_messages([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    for role in ("usr", ["user"], "tool"):
        with pytest.raises(DecalignError, match="message 1 has role .*; roles are system, developer, user, assistant"):
            validate_messages([{"role": "system", "content": "s"}, {"role": role, "content": "hi"}])
