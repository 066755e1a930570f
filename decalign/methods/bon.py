"""Best-of-N: sample N answers per prompt in one batch, score them, keep the best.

    rows: N per prompt, forked after one prefill of the prompt
    every row: sample a whole answer
    answer: argmax over the prompt's N rows of reward(prompt, answer)   (the first of equals wins)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DecalignError
from ..result import Result
from .base import SamplingParams, param, register
from .sample import WholeAnswers


@dataclass
class BestOfNConfig(SamplingParams):
    """n candidates per prompt; temperature, top_k, top_p as for sampling."""

    n: int = param(4, "candidates per prompt")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n < 1:
            raise DecalignError(f"n must be >= 1, got {self.n}")


@register("bon", BestOfNConfig, needs_reward=True, summary="best of n sampled answers by reward")
class BestOfN(WholeAnswers):
    streams_tokens = False  # no token is final until the best answer is known

    def rows_per_prompt(self) -> int:
        return self.config.n

    def answer(self, rows: list[int]) -> list[Result]:
        job, batch, n = self.job, self.batch, self.config.n
        scores = job.score([job.prompt_of(batch, r) for r in rows], [batch.text(r) for r in rows])
        best_rows, rewards, candidates = [], [], []
        for p in range(len(job.prompts)):
            mine = range(p * n, (p + 1) * n)
            best = max(mine, key=lambda i: scores[i])
            best_rows.append(rows[best])
            rewards.append(scores[best])
            candidates.append([job.candidate(batch, rows[i], scores[i]) for i in mine])
        return job.results(batch, best_rows, rewards=rewards, candidates=candidates)
