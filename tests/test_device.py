"""Device selection: --device / $DECALIGN_DEVICE, CUDA when visible, clear errors otherwise."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from decalign.errors import DecalignError


def test_device_names_resolve_or_fail_in_one_line(monkeypatch):
    from decalign.engine.core import pick_device

    monkeypatch.delenv("DECALIGN_DEVICE", raising=False)
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("DECALIGN_DEVICE", "cpu")
    assert pick_device() == torch.device("cpu")
    with pytest.raises(DecalignError, match="unknown device 'gpu0'"):
        pick_device("gpu0")
    with pytest.raises(DecalignError, match="cpu or cuda"):
        pick_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(DecalignError, match="no CUDA GPU is visible"):
            pick_device("cuda")


def test_cli_refuses_a_bad_device_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "decalign.cli", "--device", "tpu", "methods"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "unknown device" in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_batched_answers_equal_single_ones(tiny_path):
    from decalign import Engine
    from decalign.api import run
    from decalign.request import Request

    engine = Engine.load(str(tiny_path), device="cuda")
    assert engine.device.type == "cuda"
    prompts = ["hi", "The answer is", "bread"]
    seeds = [3, 4, 5]
    together = run(Request.build(prompts=prompts, method="sample", model=engine, seed=seeds, max_new_tokens=8))
    for prompt, seed, answer in zip(prompts, seeds, together):
        alone = run(Request.build(prompts=[prompt], method="sample", model=engine, seed=[seed], max_new_tokens=8))[0]
        assert alone.tokens == answer.tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_named_adapters_share_a_batch_each_row_with_its_own(tiny_path, two_adapters):
    """In bfloat16 with float32 adapter weights (PEFT's casts), rows of two adapters and of the base in
    one batch give what each gives in a batch of its own, and differ between them; a request naming an
    adapter decodes it alike alone and beside another prompt."""
    from decalign import Engine, generate
    from decalign.engine import BASE

    engine = Engine.load(str(tiny_path), device="cuda", adapters=two_adapters)
    assert engine.model.dtype == torch.bfloat16 or not torch.cuda.is_bf16_supported()
    ids = [engine.render(t) for t in ("hi", "The answer is")]
    prompts, names = ids * 3, ["a", "a", "b", "b", BASE, BASE]
    mixed = engine.start(prompts, adapters=names).logits
    for name, rows in (("a", slice(0, 2)), ("b", slice(2, 4)), (BASE, slice(4, 6))):
        assert torch.equal(mixed[rows], engine.start(prompts, adapters=[name] * 6).logits[rows])
    assert not torch.equal(mixed[0:2], mixed[2:4]) and not torch.equal(mixed[0:2], mixed[4:6])
    (alone,) = generate("hi", model=engine, adapter_name="b", max_new_tokens=8, seed=1)
    (together, _) = generate(["hi", "hi"], model=engine, adapter_name="b", max_new_tokens=8, seed=[1, 2])
    assert alone.tokens == together.tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_a_finished_batch_goes_back_to_the_driver(tiny_path):
    """An idle server hands torch's cached GPU blocks back (`release_memory`): after a batch of 512
    rows, the allocator holds what it held before it (the weights), not the batch's cache."""
    from decalign import Engine
    from decalign.api import run
    from decalign.memory import release_memory
    from decalign.request import Request

    engine = Engine.load(str(tiny_path), device="cuda")
    run(Request.build(prompts=["hi"], model=engine, seed=0, max_new_tokens=4))
    release_memory()
    before = torch.cuda.memory_reserved()
    run(Request.build(prompts=["hi"] * 32, method="bon", params={"n": 16}, model=engine, seed=0, max_new_tokens=64,
                      reward=lambda prompts, answers: [float(len(a)) for a in answers]))
    assert torch.cuda.memory_reserved() > before
    release_memory()
    assert torch.cuda.memory_reserved() <= before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_decoder_equals_transformers_forward_with_grouped_heads(tiny_path):
    """On a GPU the decoder repeats grouped key heads for the planless kernels: its logits over a
    padded batch of prompts and a few steps still equal transformers' forward (float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from decalign import Engine
    from decalign.sampling import GREEDY

    batches = []
    for lean in (True, False):
        model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).to("cuda")
        engine = Engine(model, AutoTokenizer.from_pretrained(tiny_path))
        assert engine.decoder is not None and model.config.num_key_value_heads < model.config.num_attention_heads
        if not lean:
            engine.decoder = None
        batch = engine.start([engine.render(t) for t in ("hi", "The answer is", "bread and butter")], max_new_tokens=8)
        batch.extend(GREEDY, max_tokens=5)
        batches.append(batch)
    mine, theirs = batches
    assert mine.tokens == theirs.tokens
    assert torch.allclose(mine.logits, theirs.logits, atol=1e-4)


@pytest.fixture(scope="module")
def cuda_value(tmp_path_factory, tiny_path):
    """A value trained on CUDA for the tiny policy (a length reward: any value will do here)."""
    from decalign.values.train import train_value

    folder = tmp_path_factory.mktemp("cuda-value")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "bread {i}"}}\n' for i in range(8)))
    train_value(prompts=prompts, reward_spec="length:target=5:unit=chars", out=folder / "value", model=str(tiny_path),
                n=3, max_new_tokens=8, temperature=1.0, top_k=0, batch_size=8, validation=0.25, progress=False,
                log=lambda line: None)
    return str(folder / "value")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method, params", [
    ("bon", {"n": 3}), ("rs", {"proposals": 2, "max_retries": 2}),
    ("cards", {"tau_u": 1.0, "proposals": 2}), ("cards", {"tau_u": 1.0, "proposals": 2, "segmentation": "punctuation"}),
    ("cards", {"value": True}), ("args", {"k": 3, "value": True}), ("smc", {"budget": 4, "value": True}),
    ("spec_rejection", {"budget": 4, "interval": 4, "value": True}), ("treebon", {"budget": 4, "value": True}),
    ("blockwise", {"budget": 4, "value": True}),
])
def test_on_cuda_every_search_method_runs_and_repeats_itself(tiny_path, cuda_value, method, params):
    """Every tensor a method builds lives on the policy's device; the same seed gives the same answers."""
    from decalign import Engine
    from decalign.api import generate

    engine = Engine.load(str(tiny_path), device="cuda")
    if params.get("value"):
        params = {**params, "value": cuda_value}
    runs = [generate(["hi", "The answer is"], method=method, model=engine, reward="length:target=5:unit=chars",
                     max_new_tokens=10, seed=1, **params) for _ in range(2)]
    assert [r.tokens for r in runs[0]] == [r.tokens for r in runs[1]]
    assert all(r.tokens and len(r.tokens) <= 10 for r in runs[0])
