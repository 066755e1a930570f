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
