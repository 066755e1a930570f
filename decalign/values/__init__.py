"""Prefix values: V(prefix) ~ E[final reward | prefix], read off the policy's own hidden states.

A value is a linear head (CD-FUDGE, Mudgal et al., arXiv:2310.17022: an L2 regression of the final
reward onto prefixes of the policy's own samples). Its features for a prefix of L answer tokens are,
for each of its layers l (0 = embeddings, N = the last layer's output, as the model reports them):
    mean_l = the mean of layer l's states over the L answer tokens (zeros when L = 0)
    last_l = layer l's state at the last token read (the prompt's last token when L = 0)
and log(1 + L). The engine keeps these per row as it decodes (`Batch.state_means`, `last_states`),
so scoring every proposal of every row costs one dot product; `teacher_forced_features` computes the
same numbers from text, for training and for the `value:` reward (decalign.rewards.value).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..engine.decoder import planless_attention
from ..errors import DecalignError
from ..models import local_or_id

SHIPPED = Path(__file__).resolve().parent / "weights"
FORMAT = "decalign-value-1"


def prefix_features(means: torch.Tensor, lasts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The value's input: [mean states, last states, log(1 + L)] per row."""
    return torch.cat([means.float(), lasts.float(), torch.log1p(lengths.to(means.device).float())[:, None]], dim=-1)


@dataclass
class ValueHead:
    """v(prefix) = weight . features + bias, for one policy (named in the card)."""

    name: str
    layers: list[int]
    weight: torch.Tensor  # [features]
    bias: float
    card: dict

    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.to(features.device) + self.bias

    def score_rows(self, batch, rows: Sequence[int]) -> list[float]:
        """Values of rows of a batch opened with this value's state_layers: no forward pass."""
        lengths = torch.tensor([batch.fed[r] for r in rows])
        features = prefix_features(batch.state_means(rows, self.layers), batch.last_states(rows, self.layers), lengths)
        return self.score_features(features).tolist()

    def check_engine(self, engine) -> None:
        """A one-line error when the value was trained for another policy."""
        policy = self.card.get("policy", {})
        mine = (local_or_id(policy.get("model")), local_or_id(policy.get("adapter")), policy.get("hidden_size"),
                policy.get("num_layers"))  # a card of a relative path: as seen from here
        theirs = policy_signature(engine)
        if mine != (theirs["model"], theirs["adapter"], theirs["hidden_size"], theirs["num_layers"]):
            raise DecalignError(
                f"value {self.name} was trained for model {policy.get('model')} (adapter {policy.get('adapter')}, "
                f"{policy.get('num_layers')} layers of {policy.get('hidden_size')}); this policy is {theirs['model']} "
                f"(adapter {theirs['adapter']}, {theirs['num_layers']} layers of {theirs['hidden_size']})")

    def save(self, folder: Path) -> None:

        folder.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.contiguous(), "bias": torch.tensor([self.bias])},
                  str(folder / "value.safetensors"))
        card = {**self.card, "format": FORMAT, "layers": self.layers}
        (folder / "value.json").write_text(json.dumps(card, indent=2) + "\n")


def policy_signature(engine) -> dict:
    return {"model": engine.name, "adapter": getattr(engine, "adapter", None),
            "hidden_size": engine.hidden_size, "num_layers": engine.num_layers}


def value_names() -> list[str]:
    return sorted(p.name for p in SHIPPED.iterdir() if (p / "value.json").is_file()) if SHIPPED.is_dir() else []


def load_value(spec: "str | Path | ValueHead") -> ValueHead:
    """A value by shipped name ('harmless') or folder path, loaded once per process."""
    if isinstance(spec, ValueHead):
        return spec
    return _load_value(str(spec))


@functools.lru_cache(maxsize=8)
def _load_value(spec: str) -> ValueHead:

    folder = SHIPPED / spec if spec in value_names() else Path(spec)
    if not (folder / "value.json").is_file() or not (folder / "value.safetensors").is_file():
        shipped = ", ".join(value_names()) or "none"
        raise DecalignError(f"no value {spec!r}: give a shipped name ({shipped}) or a folder holding "
                            "value.json and value.safetensors (decalign train-value writes one)")
    try:
        card = json.loads((folder / "value.json").read_text())
        tensors = load_file(str(folder / "value.safetensors"))
        weight, bias = tensors["weight"].float(), float(tensors["bias"].reshape(-1)[0])
        layers = [int(layer) for layer in card["layers"]]
        hidden = int(card["policy"]["hidden_size"])
    except (json.JSONDecodeError, SafetensorError, KeyError, TypeError, ValueError, IndexError, OSError) as exc:
        raise DecalignError(f"value {spec}: unreadable value files ({type(exc).__name__}: {exc})") from None
    if card.get("format") != FORMAT or weight.ndim != 1 or weight.numel() != 2 * len(layers) * hidden + 1:
        raise DecalignError(f"value {spec}: not a {FORMAT} value of {len(layers)} layers x {hidden} "
                            f"(weight has {weight.numel()} numbers)")
    if not math.isfinite(bias) or not torch.isfinite(weight).all():
        raise DecalignError(f"value {spec}: weights are not finite")
    return ValueHead(name=spec, layers=layers, weight=weight, bias=bias, card=card)


@torch.no_grad()
def teacher_forced_features(engine, prompt_ids: Sequence[int], answers: Sequence[Sequence[int]],
                            layers: Sequence[int], lengths: Sequence[Sequence[int]]) -> torch.Tensor:
    """Features of prefixes of answers to one prompt, from one forward pass over all answers:
    row k * ... lists answer k's prefixes of lengths[k] tokens, in order."""
    width = len(prompt_ids) + max(len(a) for a in answers)
    ids = torch.full((len(answers), width), engine.pad_id, dtype=torch.long)
    mask = torch.zeros((len(answers), width), dtype=torch.long)
    for k, answer in enumerate(answers):  # right-padded: a causal model never sees the padding
        sequence = list(prompt_ids) + list(answer)
        ids[k, :len(sequence)] = torch.tensor(sequence)
        mask[k, :len(sequence)] = 1
    with planless_attention():
        out = engine.model(input_ids=ids.to(engine.device), attention_mask=mask.to(engine.device),
                           output_hidden_states=True, use_cache=False, logits_to_keep=1)
    states = torch.cat([out.hidden_states[layer] for layer in layers], dim=-1)  # answers x width x F
    start = len(prompt_ids)
    rows = []
    for k, wanted in enumerate(lengths):
        sums = torch.cumsum(states[k, start:start + len(answers[k])], dim=0)
        for length in wanted:
            mean = sums[length - 1] / length if length > 0 else torch.zeros_like(states[k, 0])
            rows.append((mean, states[k, start + length - 1], length))
    means, lasts, counts = zip(*rows)
    return prefix_features(torch.stack(means), torch.stack(lasts), torch.tensor(counts))
