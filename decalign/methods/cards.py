"""CARDS, cascade reward sampling (Li et al., arXiv:2406.16306): segment-level rejection sampling.

    r0 = (1 - alpha) * r(prompt) + alpha * r_star
    until the answer ends:
        propose a segment: sample (top-k at `temperature`) until the next token's entropy >= tau_u
                           (after at least min_segment tokens, at most max_segment)
        r = reward(prompt, accepted prefix + segment)
        tau(t) = min(r0 + t / n_max * (r_star - r0), r_star)     t = tokens incl. the segment
        accept with probability min(1, exp((r - tau) / beta)); else resample from the same prefix;
        after max_retries rejections take the best of the attempts

Differences from the authors' code, all keeping its semantics (see docs/cards.md): the KV cache is
kept and a rejected segment is cropped out of it; K proposals per round are drawn in one batch and
tested in order (same distribution as one at a time); many prompts run together; generation stops
at EOS and never passes max_new_tokens; r_star, when not given, is calibrated per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import EntropyStop, MaxProbStop, PunctuationCut, Sample
from ..errors import DecalignError
from .base import param, register
from .rejection import PromptState, RejectionParams, RejectionSampler

SEGMENTATIONS = ("entropy", "maxprob", "punctuation", "fixed")
# What a parameter left at None means: the paper's settings, or with a prefix value the ones that reach
# Best-of-8's reward for half its time on the benchmark (docs/cards.md): T=1 proposals, no top-k, and each
# segment must raise the accepted prefix's value, or the best of four is taken.
PAPER_MODE = {"anchor": "prompt", "acceptance": "soft", "max_retries": 20, "top_k": 40}
VALUE_MODE = {"anchor": "prefix", "acceptance": "hard", "max_retries": 3, "top_k": 0, "temperature": 1.0}


@dataclass
class CardsConfig(RejectionParams):
    """Paper defaults: tau_u 3.0, alpha 0.5, beta 0.7 (also the sampling temperature), top_k 40,
    segments of 4..64 tokens, best of 21 after 20 rejections. With `value`, the parameters left at
    None take VALUE_MODE's settings instead of PAPER_MODE's."""

    alpha: float = param(0.5, "where the threshold starts: r0 = (1 - alpha) r(prompt) + alpha r_star")
    tau_u: float = param(3.0, "entropy threshold in nats that ends a segment (segmentation=entropy)")
    tau_p: float = param(0.5, "1 - max probability threshold that ends a segment (segmentation=maxprob)")
    segmentation: str = param("entropy", "entropy | maxprob | punctuation | fixed (max_segment tokens)")
    min_segment: int = param(4, "fewest tokens in a segment")
    max_segment: int = param(64, "most tokens in a segment")
    anchor: str | None = param(None, "prompt: tau rises from r0 (the paper); prefix: from the accepted prefix's "
                                     "score. None: prompt, or prefix with a value")
    value: str | None = param(None, "prefix value (shipped name or folder) scoring partial answers; the reward "
                                    "scores finished ones")
    temperature: float | None = param(None, "sampling temperature; None = beta (the paper), or 1 with a value")
    top_k: int | None = param(None, "top-k of the proposals (0 = off); None: 40, or 0 with a value")
    max_retries: int | None = param(None, "rejections before the best attempt is taken; None: 20, or 3 with a value")
    acceptance: str | None = param(None, "soft: accept with min(1, exp((r - threshold) / beta)); hard: r >= "
                                         "threshold. None: soft, or hard with a value")

    def __post_init__(self) -> None:
        for name, setting in (VALUE_MODE if self.value else PAPER_MODE).items():
            if getattr(self, name) is None:
                setattr(self, name, setting)
        super().__post_init__()
        if not 0 <= self.alpha <= 1:
            raise DecalignError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.tau_u < 0:
            raise DecalignError(f"tau_u must be >= 0, got {self.tau_u}")
        if not 0 <= self.tau_p <= 1:
            raise DecalignError(f"tau_p must be in [0, 1], got {self.tau_p}")
        if self.segmentation not in SEGMENTATIONS:
            raise DecalignError(f"segmentation must be one of {', '.join(SEGMENTATIONS)}, got {self.segmentation!r}")
        if self.anchor not in ("prompt", "prefix"):
            raise DecalignError(f"anchor must be prompt or prefix, got {self.anchor!r}")
        if not 1 <= self.min_segment <= self.max_segment:
            raise DecalignError(f"need 1 <= min_segment <= max_segment, got {self.min_segment} and {self.max_segment}")

    def proposal(self) -> Sample:
        rules = {
            "entropy": {"stop_rule": EntropyStop(self.tau_u, self.min_segment)},
            "maxprob": {"stop_rule": MaxProbStop(self.tau_p, self.min_segment)},
            "punctuation": {"cut_rule": PunctuationCut(min_entropy=1.0, min_tokens=self.min_segment)},
            "fixed": {},
        }[self.segmentation]
        return Sample((), self.sampling, max_tokens=self.max_segment, **rules)


def threshold(prompt_reward: float, r_star: float, alpha: float, tokens: int, n_max: int) -> float:
    """tau(t) = min(r0 + t / n_max * (r_star - r0), r_star), r0 = (1 - alpha) r(prompt) + alpha r_star."""
    r0 = (1 - alpha) * prompt_reward + alpha * r_star
    return min(r0 + tokens / n_max * (r_star - r0), r_star)


def relative_threshold(prefix_reward: float, prefix_tokens: int, prompt_reward: float, r_star: float, alpha: float,
                       tokens: int, n_max: int) -> float:
    """The schedule's rise anchored at the accepted prefix: r(prefix) + (t - t_prefix) / n_max * (r_star - r0).

    For rewards whose level drifts with length (so that the absolute tau is out of reach or trivially
    met later in the answer), each segment must instead add its share of the planned rise."""
    r0 = (1 - alpha) * prompt_reward + alpha * r_star
    return prefix_reward + (tokens - prefix_tokens) / n_max * (r_star - r0)


@register("cards", CardsConfig, needs_reward=True,
          summary="cascade reward sampling: segments cut at entropy spikes, accepted by a rising threshold")
class Cards(RejectionSampler):
    def proposal(self) -> Sample:
        return self.config.proposal()

    def threshold(self, state: PromptState, tokens: int) -> float:
        config, n_max = self.config, self.job.max_new_tokens
        if config.anchor == "prefix" and state.reward is not None:
            return relative_threshold(state.reward, state.prefix_tokens, state.prompt_reward, state.r_star,
                                      config.alpha, tokens, n_max)
        return threshold(state.prompt_reward, state.r_star, config.alpha, tokens, n_max)
