import sys
import textwrap

import pytest

from decalign import DecalignError, load_reward
from decalign.rewards import CallableReward, Reward


def test_sentiment_orders_kind_above_hostile_and_counts():
    reward = load_reward("sentiment")
    kind, neutral, hostile, empty = reward.score(["q"] * 4, ["Thank you, I love it!", "It is a table.",
                                                             "I hate you, idiot.", ""])
    assert kind > neutral > hostile and empty == 0.0
    assert (reward.calls, reward.items) == (1, 4)


def test_python_reward_is_imported_only_when_named(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text(textwrap.dedent("""
        def shouting(prompts, responses):
            return [sum(c.isupper() for c in r) for r in responses]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "my_scores" not in sys.modules
    reward = load_reward("python:my_scores:shouting")
    assert reward.score(["a", "b"], ["HELLO", "hi"]) == [5.0, 0.0]
    with pytest.raises(DecalignError, match="cannot import reward"):
        load_reward("python:my_scores:missing")
    with pytest.raises(DecalignError, match="python:module:function"):
        load_reward("python:my_scores")


def test_callable_and_subclass_rewards():
    per_item = CallableReward(len, per_item=True, name="length")
    assert per_item.score(["p"], ["abc"]) == [3.0] and per_item.name == "length"

    class Constant(Reward):
        name = "constant"

        def _score(self, prompts, responses):
            return [1.0] * len(responses)

    reward = Constant()
    assert load_reward(reward) is reward
    with pytest.raises(DecalignError, match="returned 1 scores for 2"):
        CallableReward(lambda p, r: [0.0]).score(["a", "b"], ["x", "y"])
    for iterable in ("12", {0: 1.0, 1: 2.0}):  # as many items as responses, but not numbers per response
        with pytest.raises(DecalignError, match=f"returned a {type(iterable).__name__}; it must return one number"):
            CallableReward(lambda p, r, it=iterable: it).score(["a", "b"], ["x", "y"])


def test_a_failing_reward_names_itself_and_the_item():
    def picky(prompts, responses):
        return [1.0 / len(r) for r in responses]  # raises on an empty answer

    with pytest.raises(DecalignError, match=r"reward picky failed on item 1 \(response ''\): ZeroDivisionError"):
        load_reward(picky).score(["a", "b", "c"], ["fine", "", "ok"])
    with pytest.raises(DecalignError, match="non-finite score \\(nan\\) to item 0"):
        load_reward(lambda p, r: [float("nan")]).score(["a"], ["x"])


def test_a_reward_retrained_at_the_same_spec_is_refused_on_resume(tmp_path, monkeypatch):
    """A resumed job compares the reward's spec, which names a path or module; a reward retrained
    there scores otherwise, and its scores must not be mixed with the old ones under one spec."""
    import json

    from decalign.batch_job import run_score

    (tmp_path / "weighted_length.py").write_text(textwrap.dedent("""
        import pathlib
        WEIGHT = pathlib.Path(__file__).with_name("weight.txt")

        def score(prompts, responses):
            return [float(WEIGHT.read_text()) * len(r) for r in responses]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "weight.txt").write_text("1.0")
    source, out = tmp_path / "answers.jsonl", tmp_path / "scores.jsonl"
    source.write_text(json.dumps({"id": 1, "prompt": "q", "response": "abc"}) + "\n")
    run_score(source, out, "python:weighted_length:score")
    with source.open("a") as handle:
        handle.write(json.dumps({"id": 2, "prompt": "q", "response": "abcd"}) + "\n")
    (tmp_path / "weight.txt").write_text("1.00000001")  # float noise: the same reward, resumed
    run_score(source, out, "python:weighted_length:score")
    with source.open("a") as handle:
        handle.write(json.dumps({"id": 3, "prompt": "q", "response": "abcde"}) + "\n")
    (tmp_path / "weight.txt").write_text("2.0")  # retrained
    with pytest.raises(DecalignError, match="another configuration \\(the reward's weights differ\\)"):
        run_score(source, out, "python:weighted_length:score")
    assert [round(r["score"], 3) for r in map(json.loads, out.read_text().splitlines())] == [3.0, 4.0]
