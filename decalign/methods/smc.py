"""Sequential Monte Carlo (particle filtering) towards p(y) exp(r(y) / beta), twisted by the prefix value.

    start `budget` particles per prompt (one prefill, forked), log-weights 0, potentials 0
    until every particle has ended:
        each unfinished particle writes `block` tokens
        its new potential: the prefix value V / beta (the reward r / beta once it has ended)
        log-weight += new potential - old potential
        if the effective sample size (sum w)^2 / sum w^2 < ess_threshold * budget:
            resample the particles by weight (systematic), log-weights back to 0
    answer: the ended particle with the highest reward (pick = best),
            or one drawn by weight, a draw from the target (pick = sample)

This is the twisted SMC of genlm-control and its_hub's particle filtering, with the value as the
twist: the weights of an ended particle telescope to exp(r / beta) over its proposal, so the
weighted particles approximate the target whatever the value, and a good value spends the
particles where the reward will be high. A particle that ends keeps its weight and may be resampled
(copied) like the others. With ess_threshold = 0 it never resamples (Best-of-N with weights);
with 1 it resamples whenever the weights differ. The prefix that all particles share is final: it
streams as it grows.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field

from ..engine import Batch, Move, Segment
from ..errors import DecalignError
from ..sampling import derive_seed
from .base import Search, SearchParams, param, register

PICKS = ("best", "sample")


@dataclass
class SMCConfig(SearchParams):
    budget: int = param(8, "particles per prompt")
    block: int = param(8, "tokens a particle writes between weightings")
    beta: float = param(0.02, "target p(y) exp(reward / beta): smaller leans harder on the reward (> 0)")
    ess_threshold: float = param(0.5, "resample when the effective sample size falls below this share of the "
                                      "particles, in [0, 1] (0: never, 1: whenever the weights differ)")
    pick: str = param("best", "the answer: best (highest reward among the final particles) or sample (drawn "
                              "by weight: a draw from the target)")
    trace: bool = param(False, "keep each step's weights and resampling in the result's trace")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_counts("block")
        if not self.beta > 0:
            raise DecalignError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.ess_threshold <= 1:
            raise DecalignError(f"ess_threshold must be in [0, 1], got {self.ess_threshold}")
        if self.pick not in PICKS:
            raise DecalignError(f"pick must be one of {', '.join(PICKS)}, got {self.pick!r}")


@dataclass
class Particles:
    """One prompt's particles: their rows, log-weights and potentials (score / beta at their last step)."""

    rows: list[int]
    random: random.Random
    log_weight: dict[int, float] = field(default_factory=dict)
    potential: dict[int, float] = field(default_factory=dict)
    reward: dict[int, float] = field(default_factory=dict)  # ended particles
    moving: list[int] = field(default_factory=list)  # rows writing this step
    shared: int = 0  # tokens all particles agree on
    published: int = 0  # characters of their text published
    steps: int = 0
    resamples: int = 0
    trace: list[dict] = field(default_factory=list)

    def weights(self) -> list[float]:
        top = max(self.log_weight[r] for r in self.rows)
        return [math.exp(self.log_weight[r] - top) for r in self.rows]


def effective_sample_size(weights: list[float]) -> float:
    return sum(weights) ** 2 / sum(w * w for w in weights)


def systematic_resample(weights: list[float], draw: float) -> list[int]:
    """How many copies each particle gets: N evenly spaced points (offset draw / N, draw in [0, 1))
    through the cumulative weights. Unbiased: particle i's expected count is N w_i / sum w."""
    n, total = len(weights), sum(weights)
    counts, cumulative, i = [0] * n, weights[0] / total, 0
    for k in range(n):
        point = (draw + k) / n
        while point >= cumulative and i < n - 1:
            i += 1
            cumulative += weights[i] / total
        counts[i] += 1
    return counts


@register("smc", SMCConfig, needs_reward=True,
          summary="sequential Monte Carlo: particles weighted by the prefix value, resampled when their weights degenerate")
class SMC(Search):
    def begin(self, batch: Batch, rows: list[list[int]]) -> None:
        self.particles = [Particles(rows=list(group), random=random.Random(derive_seed(seed, "smc")))
                          for group, seed in zip(rows, self.job.seeds)]
        self.segments: dict[int, Segment] = {}
        for state in self.particles:
            state.log_weight = {r: 0.0 for r in state.rows}
            state.potential = {r: 0.0 for r in state.rows}
            self._step(state)

    def _step(self, state: Particles) -> None:
        state.moving = [r for r in state.rows if self.batch.finish[r] is None]
        self.open(state.moving)

    def moves(self) -> list[Move]:
        return self.stretch((r for p, state in enumerate(self.particles) if self.results[p] is None
                             for r in state.moving), self.config.block)

    def react(self) -> None:
        for p, state in enumerate(self.particles):
            if self.results[p] is None and self.stretched(state.moving):
                self._weigh(p, state)

    def _weigh(self, p: int, state: Particles) -> None:
        job, batch, config = self.job, self.batch, self.config
        state.steps += 1
        for row, score in zip(state.moving, job.evaluate(batch, state.moving)):
            if batch.finish[row] is not None:
                state.reward[row] = score
            state.log_weight[row] += score / config.beta - state.potential[row]
            state.potential[row] = score / config.beta
        weights = state.weights()
        ess = effective_sample_size(weights)
        ended = all(batch.finish[r] is not None for r in state.rows)
        resample = not ended and ess < config.ess_threshold * len(state.rows)
        if config.trace:
            state.trace.append({"step": state.steps, "ess": ess, "resampled": resample,
                                "weights": [w / sum(weights) for w in weights]})
        if resample:
            state.resamples += 1
            counts = systematic_resample(weights, state.random.random())
            source = self.branch(dict(zip(state.rows, counts)))
            state.potential = {r: state.potential[s] for r, s in source.items()}
            state.reward = {r: state.reward[s] for r, s in source.items() if s in state.reward}
            state.log_weight = {r: 0.0 for r in source}
            state.rows = list(source)
        self._publish_shared(p, state)
        if ended:
            self.results[p] = self._answer(p, state)
        else:
            self._step(state)

    def _publish_shared(self, p: int, state: Particles) -> None:
        """Publish the text every particle agrees on as it grows (stop strings cut): no resampling can change it."""
        tokens = [self.batch.tokens[r] for r in state.rows]
        shared = next((i for i in range(min(map(len, tokens))) if len({t[i] for t in tokens}) > 1),
                      min(map(len, tokens)))
        if shared > state.shared:
            state.shared = shared
            text = os.path.commonprefix([self.job.engine.decode(tokens[0][:shared]), self.batch.text(state.rows[0])])
            text = text.rstrip("\ufffd")  # never half a character
            if len(text) > state.published:
                state.published = len(text)
                self.job.publish(p, text)

    def _answer(self, p: int, state: Particles):
        if self.config.pick == "best":
            row = max(state.rows, key=lambda r: (state.reward[r], -r))
        else:
            row = state.random.choices(state.rows, weights=state.weights())[0]
        distinct = {tuple(self.batch.tokens[r]): r for r in reversed(state.rows)}  # the first row of each text
        candidates = [self.job.candidate(self.batch, r, state.reward[r]) for r in sorted(distinct.values())]
        return self.job.result(p, self.batch, self.job.candidate(self.batch, row, state.reward[row]),
                               self.batch.logprobs[row], candidates=candidates,
                               trace=state.trace if self.config.trace else None,
                               extra_stats={"steps": state.steps, "resamples": state.resamples})

    def live_rows(self) -> list[int]:
        return [r for p, state in enumerate(self.particles) if self.results[p] is None for r in state.rows]

    def remap(self, new_row: dict[int, int]) -> None:
        for p, state in enumerate(self.particles):
            if self.results[p] is not None:
                state.rows = []
                continue
            state.rows = [new_row[r] for r in state.rows]
            state.moving = [new_row[r] for r in state.moving]
            for name in ("log_weight", "potential", "reward"):
                setattr(state, name, {new_row[r]: v for r, v in getattr(state, name).items() if r in new_row})
        self.move_segments(new_row)
