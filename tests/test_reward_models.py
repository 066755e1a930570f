"""hf: classifiers and judge: rewards on tiny random-weight models the tests build."""

import pytest
import torch

from decalign import DecalignError, generate, load_reward
from decalign.testing import make_tiny_classifier

PROMPTS = ["hi", [{"role": "user", "content": "Tell me about bread."}, {"role": "assistant", "content": "Yes."},
                  {"role": "user", "content": "More please."}], "The answer is"]
RESPONSES = ["Hello there, nice to meet you.", "Flour, water and salt.", "42"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return make_tiny_classifier(tmp_path_factory.mktemp("rm") / "rm")


def manual_scores(reward, prompts, responses, label=0):
    texts = reward._texts(prompts, responses)
    out = []
    for text in texts:
        ids = reward.tokenizer(text, truncation=True, max_length=reward.max_length, return_tensors="pt")
        with torch.no_grad():
            out.append(float(reward.model(**ids).logits[0, label]))
    return out


def test_classifier_scores_batched_equal_one_by_one(classifier):
    reward = load_reward(f"hf:{classifier}")
    scores = reward.score(PROMPTS, RESPONSES)
    assert scores == pytest.approx(manual_scores(reward, PROMPTS, RESPONSES), abs=1e-4)
    assert len(set(round(s, 5) for s in scores)) == 3
    assert reward.score(PROMPTS, ["", "", ""])  # empty answers are scored
    assert (reward.calls, reward.items) == (2, 6)


def test_classifier_truncation_keeps_the_response(classifier):
    reward = load_reward(f"hf:{classifier}:max_length=24")
    long_context = [{"role": "user", "content": "bread " * 200}]
    (text,) = reward._texts([long_context], ["THE END"])
    ids = reward.tokenizer(text, truncation=True, max_length=24)["input_ids"]
    assert len(ids) == 24
    assert reward.tokenizer.decode(ids).endswith("THE END")
    assert reward.score([long_context], ["THE END"]) == pytest.approx(
        manual_scores(reward, [long_context], ["THE END"]), abs=1e-4)


def test_classifier_labels(tmp_path):
    path = make_tiny_classifier(tmp_path / "three", num_labels=3)
    with pytest.raises(DecalignError, match=r"3 labels \(0=label0, 1=label1, 2=label2\)"):
        load_reward(f"hf:{path}")
    two = load_reward(f"hf:{path}:label=2")
    diff = load_reward(f"hf:{path}:label=label2-0")
    assert two.score(PROMPTS, RESPONSES) == pytest.approx(manual_scores(two, PROMPTS, RESPONSES, label=2), abs=1e-4)
    expected = [a - b for a, b in zip(manual_scores(two, PROMPTS, RESPONSES, 2), manual_scores(two, PROMPTS, RESPONSES, 0))]
    assert diff.score(PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-4)
    with pytest.raises(DecalignError, match="no label '7'"):
        load_reward(f"hf:{path}:label=7")


def test_reward_with_another_tokenizer_steers_best_of_n(classifier, engine):
    reward = load_reward(f"hf:{classifier}")
    assert len(reward.tokenizer) != len(engine.tokenizer)
    (result,) = generate("hi", method="bon", model=engine, reward=reward, n=4, max_new_tokens=8, seed=0)
    assert result.reward == max(c.reward for c in result.candidates)
    assert result.reward == pytest.approx(reward.score(["hi"], [result.text])[0], abs=1e-4)


def test_judge_is_yes_minus_no_log_odds(tiny_path):
    judge = load_reward(f"judge:{tiny_path}:rubric=Is it polite?")
    scores = judge.score(PROMPTS, RESPONSES)
    for text, score in zip(judge._texts(PROMPTS, RESPONSES), scores):
        assert "Is it polite? Answer Yes or No." in text
        ids = judge.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            logp = judge.model(**ids).logits[0, -1].log_softmax(-1)
        assert score == pytest.approx(float(logp[judge.yes] - logp[judge.no]), abs=1e-4)


def test_a_judge_cuts_what_its_model_cannot_read_from_the_left(tmp_path):
    """A judge whose model reads 64 positions scores a longer conversation from its last 64 tokens
    (the rubric and the question stay), instead of failing past the model's positions."""
    from decalign.testing import make_tiny_model

    judge = load_reward(f"judge:{make_tiny_model(tmp_path / 'short', context=64)}")
    long_answer = "word " * 200
    (score,) = judge.score(["hi"], [long_answer])
    (text,) = judge._texts(["hi"], [long_answer])
    ids = judge.tokenizer(text, add_special_tokens=False)["input_ids"][-64:]
    with torch.no_grad():
        logp = judge.model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    assert judge.max_length == 64 and score == pytest.approx(float(logp[judge.yes] - logp[judge.no]), abs=1e-4)


def test_weighted_sum_arithmetic(classifier):
    combined = load_reward(f"sentiment + 0.5*hf:{classifier} + -2*length:target=4")
    parts = [load_reward("sentiment"), load_reward(f"hf:{classifier}"), load_reward("length:target=4")]
    expected = [a + 0.5 * b - 2 * c for a, b, c in zip(*(p.score(PROMPTS, RESPONSES) for p in parts))]
    assert combined.score(PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-5)
    python_sum = parts[0] + 0.5 * parts[1]
    assert python_sum.name == f"sentiment + 0.5*hf:{classifier}"


@pytest.mark.parametrize("spec, fragment", [
    ("hf:/no/such/model", "does not exist"),
    ("length", "unknown reward"),
    ("length:target=x", "integer"),
    ("length:size=3", "bad option"),
    ("regex:(", "bad pattern"),
    ("keywords:", "needs require"),
])
def test_bad_reward_specs(spec, fragment):
    with pytest.raises(DecalignError, match=fragment):
        load_reward(spec)


def test_rule_rewards():
    assert load_reward("length:target=4").score(["q"] * 2, ["one two three four", "one two"]) == [0.0, -0.5]
    assert load_reward("keywords:require=flour|salt:forbid=poison").score(
        ["q"] * 2, ["Flour and salt.", "salt and poison"]) == [1.0, -0.5]
    assert load_reward(r"regex:\d+").score(["q"] * 2, ["x12", "none"]) == [1.0, 0.0]
    assert load_reward("json").score(["q"] * 3, ['```json\n{"a": 1}\n```', "[1, 2]", "{oops"]) == [1.0, 1.0, 0.0]
