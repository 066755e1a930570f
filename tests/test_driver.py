"""Methods as step machines: several requests of different methods share one batch and one forward
pass per step, and each gets exactly the answer it gets alone."""

import pytest

from decalign import DecalignError
from decalign.api import run, run_together
from decalign.request import Request


def length_reward(prompts, responses):
    return [float(len(r)) for r in responses]


@pytest.fixture
def requests(engine):
    common = dict(model=engine, seed=4)
    return [
        Request.build(prompts=["hi", "The answer is"], method="greedy", max_new_tokens=9, **common),
        Request.build(prompts=["bread"], method="bon", params={"n": 3}, reward=length_reward, max_new_tokens=12,
                      **common),
        Request.build(prompts=["Paris is", "hi"], method="cards", reward=length_reward, max_new_tokens=14,
                      params={"min_segment": 2, "max_segment": 5, "proposals": 2, "max_retries": 2}, **common),
        Request.build(prompts=["The quick brown fox"], method="sample", params={"temperature": 0.8},
                      max_new_tokens=7, stop=["."], **common),
        Request.build(prompts=["hello"], method="args", params={"k": 3}, reward=length_reward, max_new_tokens=5,
                      **common),
        Request.build(prompts=["bread", "hi"], method="spec_rejection", params={"budget": 4, "interval": 3},
                      reward=length_reward, max_new_tokens=10, **common),
        Request.build(prompts=["Paris is"], method="blockwise", params={"budget": 3, "block": 4}, reward=length_reward,
                      max_new_tokens=11, **common),
        Request.build(prompts=["hi", "bread"], method="smc", params={"budget": 4, "block": 3, "beta": 1.0},
                      reward=length_reward, max_new_tokens=10, **common),
        Request.build(prompts=["The answer is"], method="treebon", params={"budget": 4, "children": 2, "segment": 3},
                      reward=length_reward, max_new_tokens=9, **common),
    ]


def count_forward_passes(engine, monkeypatch) -> list[int]:
    """Forward passes of the policy, through the engine's decoder or transformers' forward alike."""
    from decalign.engine.batch import Batch

    calls = [0]
    forward = Batch._forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    monkeypatch.setattr(Batch, "_forward", counted)
    return calls


def test_methods_sharing_a_batch_answer_as_they_do_alone(engine, requests, monkeypatch):
    calls = count_forward_passes(engine, monkeypatch)
    alone = []
    for request in requests:
        alone.append(run(request))
    passes_alone, calls[0] = calls[0], 0
    together = run_together(requests)
    passes_together = calls[0]
    for mine, theirs in zip(together, alone):
        assert [r.tokens for r in mine] == [r.tokens for r in theirs]
        assert [r.reward for r in mine] == pytest.approx([r.reward for r in theirs])
        assert [r.finish_reason for r in mine] == [r.finish_reason for r in theirs]
    # one forward pass per step serves every method: far fewer than one per method per step
    assert passes_together < 0.6 * passes_alone


def test_requests_for_different_models_are_not_mixed(engine, tiny_path):
    from decalign import Engine

    other = Engine.load(str(tiny_path))
    with pytest.raises(DecalignError, match="same model"):
        run_together([Request.build(prompts=["hi"], model=engine), Request.build(prompts=["hi"], model=other)])
    with pytest.raises(DecalignError, match="no prompts"):
        run_together([Request.build(model=engine)])


@pytest.mark.parametrize("now", [False, True], ids=["in-step", "own-pass"])
def test_requests_joining_a_running_batch_answer_as_they_do_alone(engine, requests, now):
    """Continuous batching: each request joins the driver's batch a few steps after the previous one,
    while earlier ones are mid-answer, and still gets exactly the answer it gets alone, whether its
    prompt is encoded in the next step's pass or at once in its own; finished requests leave at once
    and the batch is let go when the last one is done."""
    from decalign.api import start
    from decalign.methods import Driver

    alone = [run(request) for request in requests]
    driver = Driver(engine)
    methods, finished = [start(request) for request in requests], []
    for i, method in enumerate(methods):
        driver.add([method], now=now)
        for _ in range(3 if i < len(methods) - 1 else 0):
            if driver.live:
                finished += driver.step()
    while driver.live:
        finished += driver.step()
    assert driver.batch is None and not driver.failed and sorted(map(id, finished)) == sorted(map(id, methods))
    for method, theirs in zip(methods, alone):
        assert [r.tokens for r in method.results] == [r.tokens for r in theirs]
        assert [r.reward for r in method.results] == pytest.approx([r.reward for r in theirs])


def test_a_joining_request_is_encoded_in_the_running_steps_pass(engine, monkeypatch):
    """A request added to a running batch is checked at once, costs no forward pass of its own (its
    prompt is encoded in the next step's pass, beside the running rows' tokens), and begins there."""
    from decalign.api import start
    from decalign.methods import Driver

    driver = Driver(engine)
    running = start(Request.build(prompts=["hi"], method="greedy", max_new_tokens=20, model=engine, seed=0))
    driver.add([running])
    driver.step()
    passes = []
    run_parts = engine.decoder.run
    monkeypatch.setattr(engine.decoder, "run", lambda parts: passes.append(len(parts)) or run_parts(parts))
    request = Request.build(prompts=["bread"], method="bon", params={"n": 2}, reward=length_reward,
                            max_new_tokens=5, model=engine, seed=1)
    joining = start(request)
    with pytest.raises(DecalignError, match="tokens; the model's context"):
        driver.add([start(Request.build(prompts=["bread " * 400], method="greedy", model=engine))])
    driver.add([joining])
    assert passes == [] and driver.is_running(joining) and joining not in driver.live
    driver.step()
    assert passes == [2] and joining in driver.live and joining.batch is running.batch
    while driver.live:
        driver.step()
    assert passes[1:] == [1] * (len(passes) - 1)
    monkeypatch.undo()
    assert joining.results[0].tokens == run(request)[0].tokens


@pytest.mark.parametrize("now, passes_at_add, steps_to_first_token", [(False, 0, 2), (True, 1, 1)],
                         ids=["in-step", "own-pass"])
def test_a_request_joining_in_a_pass_of_its_own_writes_its_first_token_a_step_sooner(
        engine, monkeypatch, now, passes_at_add, steps_to_first_token):
    """`add(now=True)` encodes a joining prompt at once, in a forward pass of its own: its first token
    is drawn at the next step (in-step joining encodes it in that step and draws it a step later)."""
    from decalign.api import start
    from decalign.methods import Driver

    driver = Driver(engine)
    driver.add([start(Request.build(prompts=["hi"], method="greedy", max_new_tokens=20, model=engine, seed=0))])
    driver.step()
    calls = count_forward_passes(engine, monkeypatch)
    request = Request.build(prompts=["bread"], method="greedy", max_new_tokens=6, model=engine, seed=1)
    pieces = []
    joining = start(request, lambda i, text: pieces.append(text))
    driver.add([joining], now=now)
    assert calls[0] == passes_at_add
    steps = 0
    while not pieces:
        driver.step()
        steps += 1
    assert steps == steps_to_first_token
    while driver.live:
        driver.step()
    assert joining.results[0].tokens == run(request)[0].tokens


def test_a_failing_method_leaves_alone(engine):
    """One request's reward raising stops that request only; the others in the batch are answered."""
    from decalign.api import start
    from decalign.methods import Driver

    def broken(prompts, responses):
        raise RuntimeError("scorer down")

    good = Request.build(prompts=["hi"], method="bon", params={"n": 2}, reward=length_reward, max_new_tokens=6,
                         model=engine, seed=1)
    bad = Request.build(prompts=["hi"], method="bon", params={"n": 2}, reward=broken, max_new_tokens=6,
                        model=engine, seed=1)
    driver = Driver(engine)
    methods = [start(good), start(bad)]
    driver.add(methods)
    while driver.live:
        driver.step()
    assert set(driver.failed) == {methods[1]} and "scorer down" in str(driver.failed[methods[1]])
    assert methods[0].results[0].tokens == run(good)[0].tokens
    with pytest.raises(DecalignError, match="scorer down"):
        run_together([good, bad])


def test_a_join_that_fails_is_retried_without_asking_methods_again(engine, requests, monkeypatch):
    """When a group's prompts cannot join the batch, the scheduler retries each method alone: the
    retry reuses the batch prompts the method already made (making them may load adapters)."""
    from decalign.api import start
    from decalign.engine.batch import Batch
    from decalign.methods import Driver

    driver = Driver(engine)
    first = start(requests[0])
    driver.add([first])
    driver.step()
    methods = [start(request) for request in requests[1:3]]
    asked = {id(m): 0 for m in methods}
    for method in methods:
        made = method.batch_prompts

        def counted(made=made, method=method):
            asked[id(method)] += 1
            return made()

        method.batch_prompts = counted
    check_prompts = Batch.__dict__["check_prompts"]
    monkeypatch.setattr(Batch, "check_prompts",
                        staticmethod(lambda engine, prompts: (_ for _ in ()).throw(RuntimeError("no room"))))
    with pytest.raises(RuntimeError, match="no room"):
        driver.add(methods)
    monkeypatch.setattr(Batch, "check_prompts", check_prompts)
    for method in methods:
        driver.add([method])
    assert list(asked.values()) == [1, 1]
    while driver.live:
        driver.step()
    for method, request in zip(methods, requests[1:3]):
        assert [r.tokens for r in method.results] == [r.tokens for r in run(request)]


def test_a_running_batch_lets_go_of_answered_methods(engine):
    """A busy server's batch lives as long as some request runs: the methods answered meanwhile, with
    their results and every batch they ran in, must be freed once released (they were kept forever)."""
    import gc
    import weakref

    from decalign.api import start
    from decalign.methods import Driver

    long_request = Request.build(prompts=["hi"], method="greedy", max_new_tokens=30, model=engine, seed=0)
    driver = Driver(engine)
    long = start(long_request)
    driver.add([long])
    answered = []
    for i in range(3):
        short = start(Request.build(prompts=["bread"], method="bon", params={"n": 2}, reward=length_reward,
                                    max_new_tokens=3, model=engine, seed=i))
        driver.add([short])
        while not short.done:
            driver.step()
        answered.append(weakref.ref(short))
        del short
    gc.collect()
    assert driver.live == [long] and all(ref() is None for ref in answered)
    while driver.live:
        driver.step()
    assert long.closed and long.results[0].tokens == run(long_request)[0].tokens


def test_the_batch_frees_its_cache_when_its_last_method_leaves(engine, requests):
    """A server's idle moment must not keep the last batch's cache: the methods answered may still be
    held (their answers being sent) and the batch sits in reference cycles, so its cache waited for a
    garbage collection that an idle server may not run (some 47 MiB after a load at --max-batch 64)."""
    import gc
    import weakref

    from decalign.api import start
    from decalign.methods import Driver

    driver = Driver(engine)
    methods = [start(request) for request in requests]
    driver.add(methods)
    buffers = []
    gc.disable()
    try:
        while driver.live:
            buffers += [weakref.ref(buffer) for layer in driver.batch.cache.layers
                        for buffer in layer._buffers.values() if buffer is not None]
            driver.step()
        assert driver.batch is None and buffers
        assert all(method.done for method in methods)  # still held here, as a server's answers in flight are
        assert [ref for ref in buffers if ref() is not None] == []
    finally:
        gc.enable()


def test_a_running_batch_forgets_the_prompts_of_answered_methods(engine, requests):
    """A batch that never empties must not keep every prompt it admitted (their token ids and work
    counters grew with every request a busy server answered); renumbering the prompts that stay
    changes no answer and no request's counted work."""
    from decalign.api import start
    from decalign.methods import Driver

    long_request = Request.build(prompts=["hi"], method="greedy", max_new_tokens=400, min_new_tokens=400,
                                 model=engine, seed=0)
    alone = [run(request) for request in [long_request, *requests]]
    driver = Driver(engine)
    methods = [start(long_request)]
    driver.add(methods[:1])
    most = 0
    for round_ in range(2):
        for request in requests:
            method = start(request)
            methods.append(method)
            driver.add([method])
            while not method.done and driver.live:
                driver.step()
                most = max(most, len(driver.batch.prompts) if driver.batch is not None else 0)
        assert driver.live == methods[:1], "the long request outlives every short one"
    while driver.live:
        driver.step()
    admitted = 1 + 2 * sum(len(r.prompts) for r in requests)
    assert most < admitted // 3, (most, admitted)
    for method, theirs in zip(methods, alone + alone[1:]):
        assert [r.tokens for r in method.results] == [r.tokens for r in theirs]
        assert [r.stats["forward_passes"] for r in method.results] == [r.stats["forward_passes"] for r in theirs]
