"""Prefix values: the engine's tracked states are exact, a trained value recovers a known value, and
methods with value= score partial answers by the value and finished ones by the reward only."""

import json

import pytest
import torch

from decalign import DecalignError, EntropyStop, Reward, generate
from decalign.rewards.value import ValueReward
from decalign.sampling import Sampling
from decalign.values import load_value, prefix_features, teacher_forced_features
from decalign.values.train import fit_ridge, train_value, within_prompt_correlation

SAMPLE = Sampling(temperature=1.0)
LAYERS = [1, 2]


def batch_features(batch, rows):
    lengths = torch.tensor([batch.fed[r] for r in rows])
    return prefix_features(batch.state_means(rows), batch.last_states(rows), lengths)


def recomputed(engine, prompt, tokens):
    return teacher_forced_features(engine, prompt, [tokens], LAYERS, [[len(tokens)]])[0]


def assert_states_match(engine, batch, prompts):
    rows = [r for r in range(batch.size)]
    tracked = batch_features(batch, rows)
    for i, row in enumerate(rows):
        fed = batch.tokens[row][:batch.fed[row]]
        expected = recomputed(engine, prompts[batch.prompt_of[row]], fed)
        assert torch.allclose(tracked[i], expected, atol=1e-4), (row, (tracked[i] - expected).abs().max())


def test_tracked_running_mean_equals_recompute_through_fork_crop_copy_and_force(engine, prompts):
    batch = engine.start(prompts, n=2, seeds=[1, 2, 3], max_new_tokens=30, state_layers=LAYERS)
    assert_states_match(engine, batch, prompts)  # empty answers: the prompt's last state, zero mean
    batch.extend(SAMPLE, max_tokens=5)
    segments = {s.row: s for s in batch.extend(SAMPLE, max_tokens=4, stop_rule=EntropyStop(1.0, min_tokens=2))}
    assert_states_match(engine, batch, prompts)
    live = batch.live_rows()
    batch.crop(live[:2], [batch.fed[live[0]] - 2, segments[live[1]].start])  # mid-segment and at a segment start
    batch.select([0, 0, 1, 2, 3, 4, 5])  # fork row 0
    batch.copy_row(2, [1])  # rows 0-2 belong to prompt 0
    assert_states_match(engine, batch, prompts)
    row = batch.live_rows()[0]
    drawn = batch.extend(SAMPLE, rows=[row], max_tokens=3)[0]
    batch.crop([row], [drawn.start])
    batch.force({row: drawn})  # written back in one pass
    batch.extend(SAMPLE, max_tokens=6)
    assert_states_match(engine, batch, prompts)


def test_untracked_batch_refuses_state_queries(engine, prompts):
    batch = engine.start(prompts[:1], max_new_tokens=4)
    with pytest.raises(DecalignError, match="keeps no hidden states"):
        batch.state_means([0])
    with pytest.raises(DecalignError, match="state layers"):
        engine.start(prompts[:1], max_new_tokens=4, state_layers=[99])


def test_ridge_recovers_a_linear_target():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=generator) * torch.tensor([1.0, 10, 0.1, 1, 1, 1])
    truth = torch.tensor([0.5, -0.05, 3.0, 0.0, 1.0, 0.0])
    weight, bias = fit_ridge(x, (x @ truth + 2.0).double(), 1e-9)
    assert torch.allclose(weight, truth, atol=1e-3) and abs(bias - 2.0) < 1e-3


def test_within_group_ridge_learns_differences_that_group_levels_would_drown():
    """y = a large level per group (carried by feature 0, and noise) + 0.1 * feature 1 within groups:
    centred within groups, the fit finds feature 1's weight exactly."""
    from decalign.values.train import RidgePath

    generator = torch.Generator().manual_seed(1)
    groups = torch.arange(200).repeat_interleave(8)
    level = torch.randn(200, generator=generator)[groups] * 5
    x = torch.stack([level + torch.randn(1600, generator=generator), torch.randn(1600, generator=generator)], 1)
    y = (level + 0.1 * x[:, 1]).double()
    (weight, _), = RidgePath(x, y, groups=groups.tolist()).fits(torch.arange(2), [1e-9])
    assert weight[1] == pytest.approx(0.1, abs=1e-4) and abs(weight[0]) < 1e-4


def test_within_prompt_correlation_ignores_levels_between_prompts():
    scores = [1, 2, 3, 101, 102, 103]
    finals = [0.1, 0.2, 0.3, 0.3, 0.2, 0.1]  # ranked the same way in prompt 0, reversed in prompt 1
    assert within_prompt_correlation(scores, finals, [0, 0, 0, 1, 1, 1]) == pytest.approx(0.0)
    assert within_prompt_correlation(scores[:3], finals[:3], [0, 0, 0]) == pytest.approx(1.0)


BREAD = ["How do I bake bread with flour", "Tell me about yeast and bread", "Bread recipe with water and salt",
         "Why does bread rise when I knead it", "Flour, water, salt: what bread is that", "Knead the bread dough"]
CAPITALS = ["What is the capital of France", "Paris or Berlin, which is a capital", "Name the capital of Germany",
            "Is Berlin the capital of France", "The capital city of Germany is", "Which country has Paris"]


class FamilyReward(Reward):
    """A reward whose expected value given any prefix is known: 1 for bread prompts, 0 for the others.
    It refuses to score partial answers, so a method that asks it to fails loudly."""

    name = "family"

    def __init__(self):
        super().__init__()
        self.scored: list[str] = []

    def _score(self, prompts, responses):
        self.scored += list(responses)
        return [1.0 if any(w in p.lower() for w in ("bread", "flour", "knead", "yeast")) else 0.0 for p in prompts]

    def _score_prefix(self, prompts, partials):
        raise AssertionError("a method with value= scored a partial answer with the reward")


def _write_prompts(path, texts):
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def family_value(tmp_path_factory, engine, tiny_path):
    folder = tmp_path_factory.mktemp("value")
    train = _write_prompts(folder / "train.jsonl", [f"{t} {i}" for i in range(3) for t in BREAD + CAPITALS])
    train_value(prompts=train, reward_spec=FamilyReward(), out=folder / "family", model=str(tiny_path), n=3,
                max_new_tokens=8, temperature=1.0, top_k=0, batch_size=12, validation=0.25, progress=False,
                log=lambda line: None)
    return folder / "family"


def test_trained_value_recovers_a_known_value_on_new_prompts(family_value, engine):
    value = load_value(str(family_value))
    assert value.card["policy"]["num_layers"] == 2 and value.card["data"]["validation_prompts"] == 9
    tests = [f"{t}, please" for t in BREAD[:3] + CAPITALS[:3]]
    batch = engine.start([engine.render(t) for t in tests], n=2, seeds=list(range(6)), max_new_tokens=8,
                         state_layers=value.layers)
    predictions = []
    for _ in range(4):  # at 0, 2, 4 and 6 tokens
        predictions.append(value.score_rows(batch, range(batch.size)))
        batch.extend(SAMPLE, max_tokens=2)
    predictions = torch.tensor(predictions)  # lengths x rows
    truth = torch.tensor([1.0 if batch.prompt_of[r] < 3 else 0.0 for r in range(batch.size)])
    assert (predictions - truth).abs().mean() < 0.25, predictions
    assert (predictions[:, truth == 1].min() > predictions[:, truth == 0].max()), predictions


def test_value_reward_equals_the_value_read_off_a_batch(family_value, engine):
    value = load_value(str(family_value))
    batch = engine.start([engine.render(BREAD[0])], n=2, seeds=[3], max_new_tokens=12, state_layers=value.layers)
    batch.extend(SAMPLE, max_tokens=5)
    as_reward = ValueReward(str(family_value), engine=engine)
    texts = [batch.text(r) for r in range(2)]
    # the reward re-tokenizes the text: equal when the text round-trips to the same tokens
    same = [engine.tokenizer(t, add_special_tokens=False)["input_ids"] == batch.tokens[r] for r, t in enumerate(texts)]
    scores = as_reward.score([BREAD[0]] * 2, texts)
    for r in range(2):
        if same[r]:
            assert scores[r] == pytest.approx(value.score_rows(batch, [r])[0], abs=1e-4)


@pytest.mark.parametrize("method, params", [("cards", {"tau_u": 1.0, "proposals": 2}), ("args", {"k": 3})])
def test_method_with_value_scores_partial_answers_by_the_value_only(family_value, tiny_path, method, params,
                                                                   monkeypatch):
    from decalign.values import ValueHead

    value_rows = []
    score_rows = ValueHead.score_rows

    def counted(self, batch, rows):
        rows = list(rows)
        value_rows.append(len(rows))
        return score_rows(self, batch, rows)

    monkeypatch.setattr(ValueHead, "score_rows", counted)
    reward = FamilyReward()  # its prefix scorer raises
    results = generate([BREAD[1], CAPITALS[1]], method=method, model=str(tiny_path), reward=reward,
                       max_new_tokens=10, seed=0, value=str(family_value), **params)
    finished_texts = set(reward.scored)
    for result in results:
        assert result.text in finished_texts  # the answer's reward is the reward's, on the whole answer
    assert len(reward.scored) == sum(r.stats["reward_calls"] for r in results)
    assert sum(r.stats["reward_calls"] for r in results) < sum(r.stats["generated_tokens"] for r in results)
    assert sum(r.stats["value_calls"] for r in results) == sum(value_rows) > 0  # each partial answer it scored


def test_bad_values_get_one_line_errors(tmp_path, family_value, tiny_path):
    with pytest.raises(DecalignError, match="no value"):
        load_value(str(tmp_path / "missing"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "value.json").write_text("{not json")
    (broken / "value.safetensors").write_bytes(b"junk")
    with pytest.raises(DecalignError, match="unreadable"):
        load_value(str(broken))
    other = tmp_path / "other"
    other.mkdir()
    card = json.loads((family_value / "value.json").read_text())
    card["policy"]["model"] = "another-model"
    (other / "value.json").write_text(json.dumps(card))
    (other / "value.safetensors").write_bytes((family_value / "value.safetensors").read_bytes())
    with pytest.raises(DecalignError, match="trained for model another-model"):
        generate("hi", method="cards", model=str(tiny_path), reward=FamilyReward(), max_new_tokens=4,
                 value=str(other))
    with pytest.raises(DecalignError, match="bon has no parameter value"):
        generate("hi", method="bon", model=str(tiny_path), reward=FamilyReward(), value=str(family_value))


class FirstLetterReward(Reward):
    """Depends only on an answer's first character, so every prefix already scores what the whole answer will."""

    name = "first-letter"

    def _score(self, prompts, responses):
        return [float(ord(r.lstrip()[:1] or " ") % 7) for r in responses]


def test_value_check_reports_perfect_prefix_scores_as_such(tmp_path, family_value, tiny_path):
    from decalign.values.check import check_values

    prompts = _write_prompts(tmp_path / "p.jsonl", [f"{t} {i}" for i in range(2) for t in BREAD + CAPITALS])
    table = check_values(prompts=prompts, reward_spec=FirstLetterReward(), out=tmp_path / "check",
                         values=[str(family_value)], model=str(tiny_path), n=4, max_new_tokens=12, temperature=1.0,
                         top_k=0, progress=False)
    report = json.loads((tmp_path / "check" / "value_check.json").read_text())["scorers"]
    prefix = report["first-letter (reward on prefixes)"]
    assert set(prefix) == {"4", "8"}  # answers of 12 tokens are longer than 4 and 8 only
    for figures in prefix.values():
        assert figures["correlation"] == pytest.approx(1.0) and figures["drift_sd"] == pytest.approx(0.0)
    assert f"value {family_value}" in report and "| 8 |" in table


def test_args_with_value_picks_logprob_plus_weighted_value(family_value, engine):
    value, reward = load_value(str(family_value)), FamilyReward()
    prompt_text = BREAD[2]
    (result,) = generate(prompt_text, method="args", model=engine, reward=reward, max_new_tokens=5, k=3, w=2.0,
                         value=str(family_value))
    prompt, tokens = engine.render(prompt_text), []
    for _ in range(5):
        with torch.no_grad():
            logp = engine.model(torch.tensor([prompt + tokens])).logits[0, -1].float().log_softmax(-1)
        top = logp.topk(3)
        scores = []
        for lp, token in zip(top.values.tolist(), top.indices.tolist()):
            if token in engine.eos_ids:  # a finished answer is scored by the reward
                look = reward.score([prompt_text], [engine.decode(tokens + [token])])[0]
            else:
                look = float(value.score_features(teacher_forced_features(
                    engine, prompt, [tokens + [token]], value.layers, [[len(tokens) + 1]]))[0])
            scores.append(lp + 2.0 * look)
        tokens.append(top.indices.tolist()[scores.index(max(scores))])
        if tokens[-1] in engine.eos_ids:
            break
    assert result.tokens == tokens


def test_samples_of_another_configuration_are_refused_not_mixed(tmp_path, engine):
    from decalign.records import held_output
    from decalign.values.sampling import sample_answers

    items = [(0, BREAD[0]), (1, CAPITALS[0])]
    common = dict(max_new_tokens=4, temperature=1.0, top_k=0, seed=0, batch_size=2, progress=False)
    first = sample_answers(engine, FamilyReward(), items, tmp_path / "samples.jsonl", n=3, **common)
    again = sample_answers(engine, FamilyReward(), items, tmp_path / "samples.jsonl", n=3, **common)
    assert again == first  # resumed: nothing sampled twice
    with held_output(tmp_path / "samples.jsonl"):  # as a run still going holds its samples
        with pytest.raises(DecalignError, match="samples.jsonl is being written by another job"):
            sample_answers(engine, FamilyReward(), items, tmp_path / "samples.jsonl", n=3, **common)
    with pytest.raises(DecalignError, match="another configuration \\(n differ"):
        sample_answers(engine, FamilyReward(), items, tmp_path / "samples.jsonl", n=4, **common)
    for n, temperature, problem in [(2, 1.0, "--n must be >= 3"), (3, 0.0, "--temperature must be > 0")]:
        with pytest.raises(DecalignError, match=problem):
            sample_answers(engine, FamilyReward(), items, tmp_path / "other.jsonl", n=n,
                           **{**common, "temperature": temperature})


class CapitalsReward(FamilyReward):
    """FamilyReward's opposite: 1 for capital-city prompts, 0 for bread prompts."""

    name = "capitals"

    def _score(self, prompts, responses):
        return [1.0 - s for s in super()._score(prompts, responses)]


def test_a_new_reward_reuses_the_sampled_answers_rescored(family_value, engine, tiny_path, tmp_path, monkeypatch):
    from decalign.records import load_output
    from decalign.values.train import train_value

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again although every answer could be reused")

    monkeypatch.setattr(type(engine), "start", no_sampling)
    train = family_value.parent / "train.jsonl"
    common = dict(prompts=train, model=str(tiny_path), n=3, max_new_tokens=8, temperature=1.0, top_k=0, batch_size=12,
                  validation=0.25, progress=False, log=lambda line: None, samples_from=family_value)
    train_value(reward_spec=CapitalsReward(), out=tmp_path / "capitals", **common)
    _, old = load_output(family_value / "samples.jsonl")
    _, new = load_output(tmp_path / "capitals" / "samples.jsonl")
    assert [[a["tokens"] for a in r["answers"]] for r in new] == [[a["tokens"] for a in r["answers"]] for r in old]
    assert [a["reward"] for r in new for a in r["answers"]] == [1 - a["reward"] for r in old for a in r["answers"]]
    assert (tmp_path / "capitals" / "features.safetensors").read_bytes() == (family_value / "features.safetensors").read_bytes()
    with pytest.raises(DecalignError, match="sampled with another n"):
        train_value(reward_spec=CapitalsReward(), out=tmp_path / "other", **{**common, "n": 4})
    monkeypatch.undo()
    value = load_value(str(tmp_path / "capitals"))
    assert value.card["reward"] == "capitals"
    tests = [f"{t}, please" for t in BREAD[:3] + CAPITALS[:3]]
    batch = engine.start([engine.render(t) for t in tests], n=1, seeds=list(range(6)), max_new_tokens=4,
                         state_layers=value.layers)
    batch.extend(SAMPLE, max_tokens=2)
    scores = torch.tensor(value.score_rows(batch, range(batch.size)))
    assert scores[3:].min() > scores[:3].max(), scores  # the new reward's target: capitals up, bread down


def test_a_rerun_on_other_prompts_recomputes_the_cached_features(engine, tiny_path, tmp_path):
    """The features cache belongs to the prompts and answers it was computed from: a rerun into the
    same folder with another prompt selection must not fit the old prompts' features."""
    from safetensors import safe_open

    from decalign.values.train import answers_fingerprint, train_value

    train = _write_prompts(tmp_path / "train.jsonl", [f"{t} {i}" for i in range(2) for t in BREAD + CAPITALS])
    common = dict(prompts=train, reward_spec=FamilyReward(), out=tmp_path / "v", model=str(tiny_path), n=3,
                  max_new_tokens=6, temperature=1.0, top_k=0, batch_size=12, validation=0.25, progress=False,
                  log=lambda line: None)
    train_value(limit=8, **common)
    before = (tmp_path / "v" / "features.safetensors").read_bytes()
    train_value(offset=2, limit=8, **common)  # prompts 3-10: six of them sampled before, two new
    from decalign.records import load_output

    _, records = load_output(tmp_path / "v" / "samples.jsonl")
    wanted = [r for r in records if r["prompt"] in {json.loads(line)["prompt"]
                                                   for line in train.read_text().splitlines()[2:10]}]
    with safe_open(str(tmp_path / "v" / "features.safetensors"), "pt") as handle:
        assert handle.metadata()["answers"] == answers_fingerprint(wanted)
        assert len(set(handle.get_tensor("prompt").tolist())) == 8
    assert (tmp_path / "v" / "features.safetensors").read_bytes() != before
    from safetensors.torch import load_file

    whole = {name: t.clone() for name, t in load_file(str(tmp_path / "v" / "features.safetensors")).items()}
    cut = (tmp_path / "v" / "features.safetensors").read_bytes()[:100]
    (tmp_path / "v" / "features.safetensors").write_bytes(cut)  # a save cut short (an older run's)
    train_value(offset=2, limit=8, **common)  # computed again, not an unexpected SafetensorError
    again = load_file(str(tmp_path / "v" / "features.safetensors"))
    assert again.keys() == whole.keys() and all(torch.equal(again[k], whole[k]) for k in whole)


def test_a_value_names_its_policy_the_same_however_its_folder_is_spelled(tiny_path, monkeypatch):
    """A value trained with --model DIR is the policy's whatever the next command calls DIR (DIR/,
    a relative path): the engine names a local model by its absolute path, and a card naming a
    relative one is read from where it is used."""
    from decalign import Engine
    from decalign.values import ValueHead, policy_signature

    monkeypatch.chdir(tiny_path.parent)
    spelled = [Engine.load(f"{tiny_path}/"), Engine.load(tiny_path.name)]
    assert {engine.name for engine in spelled} == {str(tiny_path.resolve())}
    card = {"policy": {**policy_signature(spelled[0]), "model": f"./{tiny_path.name}"}}
    ValueHead(name="v", layers=[1], weight=torch.zeros(1), bias=0.0, card=card).check_engine(spelled[1])


def test_train_value_refuses_a_model_whose_layers_differ_in_width(tmp_path):
    """OPT projects its last layer to its embedding width: refused before any sampling, in one line,
    where it failed with an IndexError after all the sampling."""
    from transformers import OPTConfig, OPTForCausalLM

    from decalign.testing import make_tokenizer

    tokenizer = make_tokenizer()
    OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, word_embed_proj_dim=16, ffn_dim=64,
                             num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=128)
                   ).save_pretrained(tmp_path / "opt", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "opt")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(4)))
    with pytest.raises(DecalignError, match=r"hidden states \[16, 32\] wide"):
        train_value(prompts=prompts, reward_spec="length:target=5", out=tmp_path / "value", model=str(tmp_path / "opt"),
                    progress=False, log=lambda line: None)
