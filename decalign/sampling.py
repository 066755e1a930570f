"""Choosing the next token from logits: greedy, temperature, top-k, top-p, with per-row generators.

Each row draws from its own seeded generator, so a row's text depends on its seed and prompt,
not on which other rows happen to share its batch (the server batches unrelated requests).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .errors import DecalignError


@dataclass(frozen=True)
class Sampling:
    """How to pick a token. temperature 0 means greedy (argmax of the raw logits)."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise DecalignError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise DecalignError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise DecalignError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling(temperature=0.0)


def filtered_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Temperature-scaled logits with tokens outside top-k / top-p set to -inf."""
    scores = logits / sampling.temperature
    if sampling.top_k and sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = (cumulative - sorted_scores.softmax(-1)) >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def choose_tokens(
    logits: torch.Tensor, sampling: Sampling, generators: list[torch.Generator]
) -> torch.Tensor:
    """One token per row of `logits` (rows x vocab): argmax, or a Gumbel-max draw per row."""
    if sampling.greedy:
        return logits.argmax(-1)
    scores = filtered_logits(logits, sampling)
    uniform = torch.stack(
        [torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in generators]
    )
    gumbel = -torch.log(-torch.log(uniform.clamp_(min=1e-20, max=1 - 1e-7)))
    return (scores + gumbel).argmax(-1)


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (seed, candidate number, ...)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
