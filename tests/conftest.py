import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

from transformers.utils import logging  # noqa: E402

logging.set_verbosity_error()
logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """A 2-layer random-weight Llama with a small BPE tokenizer and a ChatML template."""
    from decalign.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def engine(tiny_path):
    from decalign import Engine

    return Engine.load(str(tiny_path))


@pytest.fixture(scope="session")
def prompt_texts():
    """Prompts of clearly different lengths."""
    return ["hi", "Tell me how to bake bread with flour and water, step by step please.", "The answer is"]


@pytest.fixture(scope="session")
def prompts(engine, prompt_texts):
    """Their token ids."""
    return [engine.render(t) for t in prompt_texts]


@pytest.fixture(scope="session")
def two_adapters(tiny_path, tmp_path_factory):
    """Two random LoRA adapters of the tiny model: name -> folder."""
    from decalign.testing import make_tiny_adapter

    folder = tmp_path_factory.mktemp("adapters")
    return {name: str(make_tiny_adapter(tiny_path, folder / name, seed=seed)) for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="session")
def served_adapters(tiny_path, two_adapters):
    """An engine with both loaded by name (as `decalign serve --adapter a=... --adapter b=...`)."""
    from decalign import Engine

    return Engine.load(str(tiny_path), adapters=two_adapters)
