"""Choosing the next token from logits: greedy, temperature, top-k, top-p, with per-row generators.

Each row draws from its own seeded generator, so a row's text depends on its seed and prompt,
not on which other rows happen to share its batch (the server batches unrelated requests) nor on
the device that computed its logits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .errors import DecalignError


class LogitTransform:
    """One job on a rows x vocab tensor of scores (the shape of HF's logits processors): a sampling
    rule is a list of them, applied in order."""

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Temperature(LogitTransform):
    value: float

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.value


@dataclass(frozen=True)
class TopK(LogitTransform):
    """Keep each row's k best tokens (ties at the k-th all stay)."""

    k: int

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if self.k >= scores.shape[-1]:
            return scores
        kth = torch.topk(scores, self.k, dim=-1).values[..., -1:]
        return scores.masked_fill(scores < kth, float("-inf"))


@dataclass(frozen=True)
class TopP(LogitTransform):
    """Nucleus: drop a token when the tokens ranked above it already reach probability p."""

    p: float

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        drop_sorted = (probs.cumsum(-1) - probs) >= self.p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        return scores.masked_fill(drop, float("-inf"))


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

    @property
    def transforms(self) -> list[LogitTransform]:
        """The rule as transforms: temperature, then top-k, then top-p (those that are on)."""
        rule: list[LogitTransform] = [Temperature(self.temperature)] if self.temperature != 1.0 else []
        if self.top_k:
            rule.append(TopK(self.top_k))
        if self.top_p < 1.0:
            rule.append(TopP(self.top_p))
        return rule


GREEDY = Sampling(temperature=0.0)


def transformed(scores: torch.Tensor, transforms: list[LogitTransform]) -> torch.Tensor:
    for transform in transforms:
        scores = transform(scores)
    return scores


def choose_tokens(
    logits: torch.Tensor, sampling: Sampling, generators: list[torch.Generator]
) -> torch.Tensor:
    """One token per row of `logits` (rows x vocab): argmax, or an inverse-CDF draw per row.

    A draw costs one uniform number from the row's own (CPU) generator and one cumulative sum over
    the vocabulary, not a vocabulary's worth of random numbers, so a row's token does not depend on
    its batch or on the device, and sampling stays a small part of a decode step."""
    if sampling.greedy:
        return logits.argmax(-1)
    scores = transformed(logits, sampling.transforms)
    weights = (scores - scores.amax(-1, keepdim=True)).exp_()  # filtered tokens weigh exactly 0
    # a CPU sums float32 in float64 and rounds each prefix; CUDA sums in the dtype it is given
    cumulative = weights.cumsum_(-1) if weights.device.type == "cpu" else weights.cumsum(-1, dtype=torch.float64)
    uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    total = cumulative[:, -1]
    targets = torch.minimum(uniform.to(total) * total, total.nextafter(total.new_zeros(())))  # below the total
    return torch.searchsorted(cumulative, targets[:, None], right=True).squeeze(1)


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (seed, candidate number, ...)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def make_generator(seed: int) -> torch.Generator:
    """A row's random stream, on the CPU whatever the policy's device (one number per draw)."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
