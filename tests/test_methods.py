"""Methods and the generate() API on the tiny model."""

import pytest
import torch

from decalign import DecalignError, Engine, generate
from decalign.methods import make_config, method_names, parse_method_spec


@pytest.fixture(scope="module")
def tiny(engine):
    return engine


def length_reward(prompts, responses):
    """Prefers longer answers (counted in characters)."""
    return [float(len(r)) for r in responses]


def test_greedy_matches_transformers_generate(tiny):
    ids = tiny.render("Tell me about bread.")
    (result,) = generate("Tell me about bread.", model=tiny, max_new_tokens=12)
    with torch.no_grad():
        reference = tiny.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12,
                                        pad_token_id=tiny.pad_id)[0, len(ids):].tolist()
    eos = [i for i, t in enumerate(reference) if t in tiny.eos_ids]
    assert result.tokens == reference[: eos[0] + 1 if eos else None]


def test_best_of_n_keeps_the_highest_reward(tiny):
    results = generate(["hi", "The answer is"], method="bon", model=tiny, reward=length_reward, n=5,
                       max_new_tokens=12, seed=3)
    for result in results:
        assert len(result.candidates) == 5
        rewards = [c.reward for c in result.candidates]
        assert result.reward == max(rewards)
        assert result.text == result.candidates[rewards.index(max(rewards))].text
        assert result.stats["reward_calls"] == 5
        assert result.stats["generated_tokens"] == sum(len(c.tokens) for c in result.candidates)
        assert result.stats["discarded_tokens"] == result.stats["generated_tokens"] - len(result.tokens)
        # five candidates forked from one prefill
        assert result.stats["prefill_tokens"] == len(tiny.render(["hi", "The answer is"][results.index(result)]))


def test_best_of_n_candidates_are_the_sampled_answers(tiny):
    """bon's candidates are exactly what `sample` draws with the same per-row seeds (fork = independent rows)."""
    bon = generate("hi", method="bon", model=tiny, reward=length_reward, n=3, max_new_tokens=10, seed=[5])[0]
    batch = tiny.start([tiny.render("hi")], n=3, seeds=[5], max_new_tokens=10)
    from decalign.sampling import Sampling

    batch.extend(Sampling(1.0))
    assert [c.tokens for c in bon.candidates] == batch.tokens


def test_generate_is_independent_of_batch_size(tiny):
    prompts = ["hi", "bread", "The quick brown fox", "Paris is"]
    one = generate(prompts, method="sample", model=tiny, max_new_tokens=10, seed=1, batch_size=1)
    all_ = generate(prompts, method="sample", model=tiny, max_new_tokens=10, seed=1, batch_size=4)
    assert [r.tokens for r in one] == [r.tokens for r in all_]
    again = generate(prompts, method="sample", model=tiny, max_new_tokens=10, seed=1, batch_size=3)
    assert [r.text for r in again] == [r.text for r in one]


def test_messages_and_system_go_through_the_chat_template(tiny):
    ids = tiny.render([{"role": "user", "content": "hi"}], system="Be brief.")
    text = tiny.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    assert tiny.render("hi") == tiny.render([{"role": "user", "content": "hi"}])
    assert tiny.render("hi", chat=False) == tiny.tokenizer("hi")["input_ids"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=""), "empty prompt"),
    (dict(prompts=[[]]), "messages"),
    (dict(prompts="hi", method="nope"), "unknown method 'nope'"),
    (dict(prompts="hi", method="bon"), "needs a reward"),
    (dict(prompts="hi", reward="nope"), "unknown reward"),
    (dict(prompts="hi", max_new_tokens=0), "max_new_tokens"),
    (dict(prompts="hi", temperature=0.5), "method greedy has no parameter temperature"),
    (dict(prompts="hi", method="sample", top_p=0), "top_p"),
    (dict(prompts="hi", method="bon", reward="sentiment", n=0), "n must be"),
    (dict(prompts="x " * 600), "context"),
])
def test_bad_input_is_a_clear_error(tiny, kwargs, message):
    with pytest.raises(DecalignError, match=message):
        generate(model=tiny, **kwargs)


def test_method_specs_parse_and_validate():
    assert parse_method_spec("bon:n=8:temperature=0.7") == ("bon", {"n": "8", "temperature": "0.7"})
    assert make_config("bon", {"n": "8"}).n == 8
    with pytest.raises(DecalignError, match="its parameters: temperature, top_k, top_p, n"):
        parse_method_spec("bon:m=3")
    with pytest.raises(DecalignError, match="parameter n must be int"):
        parse_method_spec("bon:n=many")
    for method, name, value in (("args", "w", "nan"), ("cards", "tau_u", "nan"), ("cards", "margin", "nan"),
                                ("blockwise", "temperature", "inf"), ("smc", "beta", "inf"), ("args", "w", float("inf"))):
        with pytest.raises(DecalignError, match=f"parameter {name} must be a finite number"):
            make_config(method, {name: value})  # nan passed every "must be > x" check these configs make
    assert {"greedy", "sample", "bon"} <= set(method_names())


def test_parameters_given_as_values_must_have_their_type(tiny):
    """From Python or a JSON body, a value of the wrong type is refused up front, not met as a raw
    TypeError once decoding runs (n=2.5) or silently read as something else (n=True as 1)."""
    for method, name, value, kind in (("bon", "n", 2.5, "int"), ("bon", "n", True, "int"), ("args", "k", 2.5, "int"),
                                      ("rs", "top_k", "2.5", "int"), ("cards", "r_star", "x", "float"),
                                      ("cards", "trace", 1, "bool"), ("bon", "temperature", [1], "float")):
        with pytest.raises(DecalignError, match=f"parameter {name} must be {kind}, got"):
            make_config(method, {name: value})
    config = make_config("bon", {"n": 4.0, "temperature": 1})  # a whole float for an int, an int for a float
    assert (config.n, config.temperature) == (4, 1.0) and type(config.n) is int and type(config.temperature) is float
    assert make_config("cards", {"temperature": None}).temperature is None
    with pytest.raises(DecalignError, match="parameter n must be int, got 2.5"):
        generate("hi", method="bon", model=tiny, reward="length", n=2.5, max_new_tokens=3)


def test_reward_errors_name_the_reward(tiny):
    def broken(prompts, responses):
        raise RuntimeError("model exploded")

    with pytest.raises(DecalignError, match=r"reward broken failed on item 0 \(response .*\): RuntimeError: model exploded"):
        generate("hi", method="bon", model=tiny, reward=broken, n=2, max_new_tokens=4)
    with pytest.raises(DecalignError, match="non-finite"):
        generate("hi", method="bon", model=tiny, reward=lambda p, r: [float("nan")] * len(r), n=2, max_new_tokens=4)


def test_engine_load_refuses_missing_paths():
    with pytest.raises(DecalignError, match="does not exist"):
        Engine.load("/no/such/model")
    with pytest.raises(DecalignError, match="adapter path"):
        from decalign.models import load_adapter

        load_adapter(None, "/no/such/adapter")


def test_stats_count_policy_work(tiny):
    (result,) = generate("hi", model=tiny, max_new_tokens=6, min_new_tokens=6)
    stats = result.stats
    assert stats["prefill_tokens"] == len(tiny.render("hi"))
    assert stats["generated_tokens"] == 6 and stats["discarded_tokens"] == 0
    assert stats["decode_tokens"] == 5  # the last token is never fed back: nothing reads its logits
    assert stats["forward_passes"] == 6  # one prefill + five decode steps
    assert stats["reward_calls"] == 0 and stats["wall_time"] > 0


@pytest.mark.parametrize("method, params", [("greedy", {}), ("sample", {"temperature": 0.7}),
                                            ("cards", {"tau_u": 1.0, "r_star": 0.3})])
def test_listener_streams_final_text_and_cancel_stops_work(tiny, method, params):
    reward = (lambda p, r: [len(x) / 50 for x in r]) if method == "cards" else None
    seen: dict[int, list[str]] = {0: [], 1: []}
    results = generate(["hi", "The answer is"], method=method, model=tiny, reward=reward, max_new_tokens=16, seed=1,
                       listener=lambda i, text: seen[i].append(text), batch_size=1, **params)
    for i, result in enumerate(results):
        assert seen[i] and seen[i][-1] == result.text  # the last published text is the answer
        assert all(b.startswith(a) for a, b in zip(seen[i], seen[i][1:]))  # published text only grows
    stopped = generate(["hi", "The answer is"], method=method, model=tiny, reward=reward, max_new_tokens=16, seed=1,
                       cancelled=lambda i: i == 1, **params)
    assert stopped[1].tokens == [] and stopped[1].finish_reason == "cancelled"
    assert stopped[0].tokens == results[0].tokens


def test_optional_parameters_parse_from_text():
    config = make_config("cards", {"r_star": "0.5", "temperature": "none", "trace": "true", "proposals": "2"})
    assert (config.r_star, config.temperature, config.trace, config.proposals) == (0.5, None, True, 2)
    assert make_config("cards", {"value": "None"}).value is None  # optional text fields too
    assert make_config("cards", {"anchor": "none"}).anchor == make_config("cards", {}).anchor
    assert parse_method_spec("cards:r_star=0.5:beta=0.1")[1] == {"r_star": "0.5", "beta": "0.1"}
    with pytest.raises(DecalignError, match="parameter r_star must be float, got 'high'"):
        make_config("cards", {"r_star": "high"})
