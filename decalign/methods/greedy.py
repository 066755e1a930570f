"""Greedy decoding: the most likely token at every step."""

from __future__ import annotations

from dataclasses import dataclass

from ..sampling import GREEDY, Sampling
from .base import register
from .sample import WholeAnswers


@dataclass
class GreedyConfig:
    """Greedy decoding has no parameters."""


@register("greedy", GreedyConfig, summary="the most likely token at every step")
class Greedy(WholeAnswers):
    def sampling(self) -> Sampling:
        return GREEDY
