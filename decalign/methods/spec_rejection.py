"""Speculative Rejection (Sun et al., arXiv:2410.20290): Best-of-N that stops the losers early.

    start `budget` candidates per prompt (one prefill, forked)
    every `interval` tokens (a decision point):
        score the unfinished candidates' partial answers (the prefix value, else the reward's prefix scorer)
        stop the lowest-scoring fraction `alpha` of them (at least one keeps going)
    a candidate that ends is scored by the reward and waits
    answer: the finished candidate with the highest reward (the first of equals)

Compute goes to the candidates that can still win. With alpha = 0 nothing is stopped and it is
Best-of-N token for token. The authors decide when GPU memory fills; here decision points come
every `interval` tokens, which is what a fixed row budget on a CPU amounts to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..engine import Batch, Move, Segment
from ..errors import DecalignError
from ..result import Candidate
from .base import Search, SearchParams, param, register


@dataclass
class SpecRejectionConfig(SearchParams):
    budget: int = param(16, "candidates started per prompt (the N of Best-of-N)")
    alpha: float = param(0.5, "fraction of the unfinished candidates stopped at each decision point, in [0, 1)")
    interval: int = param(16, "tokens between decision points")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_counts("interval")
        if not 0 <= self.alpha < 1:
            raise DecalignError(f"alpha must be in [0, 1), got {self.alpha}")


@dataclass
class Pool:
    """One prompt's candidates: rows still writing, and finished answers with their rewards."""

    running: list[int]
    finished: list[tuple[int, Candidate, list[float]]] = field(default_factory=list)  # (start order, answer, logprobs)
    order: dict[int, int] = field(default_factory=dict)  # row -> its candidate number (ties go to the first)
    stopped: int = 0
    decisions: int = 0


@register("spec_rejection", SpecRejectionConfig, needs_reward=True,
          summary="speculative rejection: Best-of-N that stops the lowest-valued partial answers at decision points")
class SpeculativeRejection(Search):
    def begin(self, batch: Batch, rows: list[list[int]]) -> None:
        self.pools = [Pool(running=list(group), order={row: i for i, row in enumerate(group)}) for group in rows]
        self.segments: dict[int, Segment] = {}
        for pool in self.pools:
            self.open(pool.running)

    def moves(self) -> list[Move]:
        return self.stretch((r for pool in self.pools for r in pool.running), self.config.interval)

    def react(self) -> None:
        job, batch = self.job, self.batch
        for p, pool in enumerate(self.pools):
            if not pool.running or not self.stretched(pool.running):
                continue  # a decision waits for every candidate of the prompt to reach it
            ended = [r for r in pool.running if batch.finish[r] is not None]
            for row, reward in zip(ended, job.evaluate(batch, ended) if ended else []):
                pool.finished.append((pool.order[row], job.candidate(batch, row, reward), list(batch.logprobs[row])))
            pool.running = [r for r in pool.running if batch.finish[r] is None]
            if len(pool.running) > 1 and self.config.alpha > 0:
                pool.decisions += 1
                values = job.evaluate(batch, pool.running)
                keep = max(1, math.ceil(len(pool.running) * (1 - self.config.alpha)))
                ranked = sorted(range(len(pool.running)), key=lambda i: -values[i])  # stable: the first of equals
                kept = sorted(ranked[:keep])
                pool.stopped += len(pool.running) - keep
                pool.running = [pool.running[i] for i in kept]
            self.open(pool.running)
            if not pool.running:
                self.results[p] = self._answer(p, pool)

    def _answer(self, p: int, pool: Pool):
        _, best, logprobs = max(pool.finished, key=lambda item: (item[1].reward, -item[0]))
        candidates = [answer for _, answer, _ in sorted(pool.finished, key=lambda item: item[0])]
        return self.job.result(p, self.batch, best, logprobs, candidates=candidates,
                               extra_stats={"stopped": pool.stopped, "decisions": pool.decisions})

    def live_rows(self) -> list[int]:
        return [r for pool in self.pools for r in pool.running]

    def remap(self, new_row: dict[int, int]) -> None:
        for pool in self.pools:
            pool.order = {new_row[r]: i for r, i in pool.order.items() if r in new_row}
            pool.running = [new_row[r] for r in pool.running]
        self.move_segments(new_row)
