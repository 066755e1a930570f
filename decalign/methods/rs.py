"""Item-level rejection sampling (the CARDS paper's baseline): whole answers, one fixed threshold.

    until accepted: sample an answer; accept with probability min(1, exp((r - r_star) / beta));
    after max_retries rejections take the best of the attempts.

It is CARDS with one segment per answer and a constant threshold, run by the same sampler
(K answers per prompt per round, tested in order).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import Sample
from .base import register
from .rejection import PromptState, RejectionParams, RejectionSampler


@dataclass
class RejectionConfig(RejectionParams):
    """Defaults follow the CARDS code: beta 0.7 (also the sampling temperature), top_k 40, 20 retries."""


@register("rs", RejectionConfig, needs_reward=True,
          summary="item-level rejection sampling of whole answers against a fixed reward threshold")
class RejectionSampling(RejectionSampler):
    def proposal(self) -> Sample:
        return Sample((), self.config.sampling)

    def threshold(self, state: PromptState, tokens: int) -> float:
        return state.r_star
