"""Best-of-N: sample N answers per prompt in one batch, score them, keep the best.

All N candidates share the prompt's encoding (the engine forks them after one prefill).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DecalignError
from ..result import Result
from . import Job, SamplingParams, register


@dataclass
class BestOfNConfig(SamplingParams):
    """n candidates per prompt; temperature, top_k, top_p as for sampling."""

    n: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n < 1:
            raise DecalignError(f"n must be >= 1, got {self.n}")


@register("bon", BestOfNConfig, needs_reward=True, summary="best of n sampled answers by reward")
def best_of_n(job: Job, config: BestOfNConfig) -> list[Result]:
    n = config.n
    batch = job.start(n=n)
    batch.extend(config.sampling)
    scores = job.score(batch.prompt_of, [batch.text(r) for r in range(batch.size)])
    best_rows, rewards, candidates = [], [], []
    for p in range(len(job.prompts)):
        rows = range(p * n, (p + 1) * n)
        best = max(rows, key=lambda r: scores[r])  # the first of equals wins
        best_rows.append(best)
        rewards.append(scores[best])
        candidates.append([job.candidate(batch, r, scores[r]) for r in rows])
    return job.results(batch, best_rows, rewards=rewards, candidates=candidates)
