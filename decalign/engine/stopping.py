"""Segment rules: when a segment stops (before a token) or is cut (after one).

A stop rule sees a `StepView` before each token is sampled and returns one bool per row; a cut
rule sees a `TokenView` after each token is written. Both know nothing of batches or engines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class StepView:
    """What a stop rule sees before a token is sampled, one entry per row that is still writing."""

    logits: torch.Tensor  # raw next-token logits (rows x vocab)
    entropy: torch.Tensor  # entropy in nats of softmax(logits), untempered, full vocabulary
    segment_lengths: torch.Tensor  # tokens written in the current segment
    total_lengths: torch.Tensor  # tokens written since the prompt


StopRule = Callable[[StepView], torch.Tensor]


@dataclass
class TokenView:
    """What a cut rule sees after a token is written, one entry per row that wrote one."""

    tokens: list[int]
    texts: list[str]  # each token decoded alone
    entropy: torch.Tensor  # entropy of the distribution the token was drawn from (untempered)
    segment_lengths: torch.Tensor  # tokens in the segment, this one included


CutRule = Callable[[TokenView], torch.Tensor]


@dataclass
class EntropyStop:
    """Stop a segment before a token whose next-token entropy is >= threshold (CARDS)."""

    threshold: float
    min_tokens: int = 4

    def __call__(self, view: StepView) -> torch.Tensor:
        return (view.segment_lengths >= self.min_tokens) & (view.entropy >= self.threshold)


@dataclass
class MaxProbStop:
    """Stop before a token when 1 - max next-token probability is >= threshold (an ablation of CARDS)."""

    threshold: float
    min_tokens: int = 4

    def __call__(self, view: StepView) -> torch.Tensor:
        uncertainty = 1 - view.logits.softmax(-1).max(-1).values
        return (view.segment_lengths >= self.min_tokens) & (uncertainty >= self.threshold)


@dataclass
class PunctuationCut:
    """End a segment after a token holding punctuation drawn at entropy >= min_entropy (CARDS ablation)."""

    min_entropy: float = 1.0
    min_tokens: int = 4
    marks: str = ",.:;?!"

    def __call__(self, view: TokenView) -> torch.Tensor:
        punctuated = torch.tensor([any(m in text for m in self.marks) for text in view.texts], device=view.entropy.device)
        return punctuated & (view.entropy >= self.min_entropy) & (view.segment_lengths >= self.min_tokens)
