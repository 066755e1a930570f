"""A fine-tuned reward model: all-MiniLM-L6-v2 as a cross-encoder with a scalar head.

Where the `harmless` probe embeds the request and the answer apart and compares vectors, a
cross-encoder reads the end of the conversation and the answer in one input, so attention sees
both: "[CLS] conversation end [SEP] answer start [SEP]", 256 tokens at most, the answer's first
`ANSWER_BUDGET` tokens kept and the conversation cut from its start. The score is the logit of
a BertForSequenceClassification (num_labels 1) over that input.

A folder written by `cross_encoder_training.train_reward_model` holds `reward.json` (this format,
the base model, the training report) and either a PEFT LoRA adapter (`adapter_model.safetensors`,
small enough to ship) or full weights (`model.safetensors`). The base model is the embedder
package's all-MiniLM-L6-v2, loaded from its own files; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError

from ..errors import DecalignError, first_line
from .base import Prompt, Reward
from .harmless import embedder_folder, padded_batches

FORMAT = "decalign-cross-encoder-1"
MAX_LENGTH = 256
ANSWER_BUDGET = 160  # answer tokens kept; the conversation's end fills the rest


def transcript(prompt: Prompt) -> str:
    """The conversation so far as plain text, one turn a line ("user: ..."), the newest last."""
    if isinstance(prompt, str):
        return f"user: {prompt}"
    if isinstance(prompt, (list, tuple)):
        return "\n".join(f"{m.get('role', 'user')}: {m.get('content') or ''}" for m in prompt if isinstance(m, dict))
    raise DecalignError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")


class PairEncoder:
    """(prompt, answer) -> token ids of the cross-encoder's input, truncated as the module says."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        tokenizer.model_max_length = 10**9  # we truncate ourselves; silence the length warning
        self.cls, self.sep, self.pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id

    def __call__(self, prompts: Sequence[Prompt], answers: Sequence[str]) -> list[list[int]]:
        contexts = self.tokenizer([transcript(p) for p in prompts], add_special_tokens=False)["input_ids"]
        replies = self.tokenizer([a or "" for a in answers], add_special_tokens=False)["input_ids"]
        out = []
        for context, reply in zip(contexts, replies):
            reply = reply[:ANSWER_BUDGET]
            room = MAX_LENGTH - 3 - len(reply)
            context = context[-room:] if room > 0 else []  # the newest turns hold the request
            out.append([self.cls, *context, self.sep, *reply, self.sep])
        return out


def base_model(num_labels: int = 1):
    """A fresh BertForSequenceClassification on the embedded all-MiniLM-L6-v2, and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..logs import quiet_transformers

    folder = embedder_folder()
    quiet_transformers()  # the new score head's "newly initialized" notice is expected
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels, dtype=torch.float32,
                                                               use_safetensors=True)
    return model, tokenizer


def read_config(folder: Path) -> dict:
    path = folder / "reward.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise DecalignError(f"no fine-tuned reward in {folder}: it needs reward.json (train one with "
                            f"decalign train-reward --method lora)") from None
    except json.JSONDecodeError as exc:
        raise DecalignError(f"{path} is not valid JSON: {exc}") from None
    if config.get("format") != FORMAT:
        raise DecalignError(f"{path}: format {config.get('format')!r} is not {FORMAT!r}")
    return config


def load_model(folder: str | os.PathLike):
    """(model ready to score, tokenizer, config) from a folder written by train_reward_model."""
    folder = Path(folder)
    config = read_config(folder)
    model, tokenizer = base_model()
    if config["method"] == "lora":
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()  # merged: plain BERT speed
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise DecalignError(f"cannot load the adapter in {folder}: {first_line(exc)}") from None
    else:
        from safetensors.torch import load_file

        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise DecalignError(f"{folder} has no model.safetensors for its {config['method']!r} weights")
        try:
            state = load_file(str(weights))
        except SafetensorError as exc:
            raise DecalignError(f"{weights} is damaged: {first_line(exc)}") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise DecalignError(f"{weights} does not fit all-MiniLM-L6-v2: unexpected {unexpected[0]}")
    return model.eval(), tokenizer, config


def score_ids(model, sequences: Sequence[list[int]], pad: int, batch_size: int = 32) -> torch.Tensor:
    """Scores of token-id sequences, batched in length order (little padding), returned in input order."""
    out = torch.zeros(len(sequences))
    for idx, ids, mask in padded_batches(sequences, batch_size, pad):
        with torch.inference_mode():
            out[idx] = model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
    return out


class CrossEncoderReward(Reward):
    """Bradley-Terry score of an answer read together with its conversation (higher: preferred)."""

    def __init__(self, path: str | os.PathLike, *, name: str = "harmless", batch_size: int = 32) -> None:
        super().__init__()
        self.path = Path(path)
        self.name = name
        self.model, tokenizer, self.config = load_model(self.path)
        self.encode = PairEncoder(tokenizer)
        self.batch_size = batch_size

    def _score(self, prompts, responses):
        sequences = self.encode(list(prompts), [r if isinstance(r, str) else "" for r in responses])
        return score_ids(self.model, sequences, self.encode.pad, self.batch_size).tolist()
