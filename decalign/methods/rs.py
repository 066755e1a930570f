"""Item-level rejection sampling (the CARDS paper's baseline): whole answers, one fixed threshold.

    until accepted: sample an answer; accept with probability min(1, exp((r - r_star) / beta));
    after max_retries rejections take the best of the attempts.

It is CARDS with one segment per answer and a constant threshold, run by the same sampler
(K answers per prompt per round, tested in order).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..result import Result
from ..sampling import Sampling
from . import Job, register
from .rejection import Proposal, RejectionSampler, check_common


@dataclass
class RejectionConfig:
    """Defaults follow the CARDS code: beta 0.7 (also the sampling temperature), top_k 40, 20 retries."""

    r_star: float | None = None  # None = calibrated per prompt (mean + margin*std of round 1)
    beta: float = 0.7
    temperature: float | None = None
    top_k: int = 40
    max_retries: int = 20
    proposals: int = 4
    acceptance: str = "soft"
    margin: float = 1.0
    trace: bool = False

    def __post_init__(self) -> None:
        check_common(None, self.beta, self.proposals, self.max_retries, self.acceptance, self.temperature,
                     self.top_k)


@register("rs", RejectionConfig, needs_reward=True,
          summary="item-level rejection sampling of whole answers against a fixed reward threshold")
def rejection_sampling(job: Job, config: RejectionConfig) -> list[Result]:
    sampling = Sampling(config.beta if config.temperature is None else config.temperature, top_k=config.top_k)
    return RejectionSampler(job, Proposal(sampling), lambda state, tokens: state.r_star, beta=config.beta,
                            proposals=config.proposals, max_retries=config.max_retries,
                            acceptance=config.acceptance, r_star=config.r_star, margin=config.margin,
                            trace=config.trace).run()
