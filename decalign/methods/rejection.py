"""Reward rejection sampling with parallel proposals: the loop that CARDS and item-level RS share.

The sequential algorithm (the papers'): from the accepted prefix, draw a proposal, score it, accept
it with probability min(1, exp((r - threshold) / beta)); after `max_retries` rejections take the
best attempt. Here each round draws K proposals per prompt in one batch and tests them *in order*,
stopping at the first decision. Proposals are i.i.d. draws from the same prefix, and the untested
ones are thrown away unseen, so the accepted text has exactly the sequential algorithm's
distribution; K only changes how many draws are made at once.

Prompts are independent: each has its own prefix row, retry count, best attempt and random stream.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field
from typing import Callable

from ..engine import Batch, CutRule, Segment, StopRule
from ..errors import DecalignError
from ..result import Result
from ..sampling import Sampling, derive_seed
from . import Job


def accept_probability(reward: float, threshold: float, beta: float, rule: str = "soft") -> float:
    """Soft: min(1, exp((r - threshold) / beta)); hard: 1 if r >= threshold else 0."""
    if rule == "hard":
        return 1.0 if reward >= threshold else 0.0
    return math.exp(min(0.0, (reward - threshold) / beta))


def calibrate(rewards: list[float], margin: float) -> tuple[float, float]:
    """(r_star, unit) from a prompt's first proposals: r_star is their mean plus `margin` standard
    deviations, and the unit (their standard deviation) is the scale beta is measured in."""
    spread = statistics.pstdev(rewards) if len(rewards) > 1 else 0.0
    unit = spread if spread > 1e-6 else 1.0
    return statistics.fmean(rewards) + margin * spread, unit


@dataclass
class Proposal:
    """How a round proposes: a segment rule (CARDS) or nothing (whole answers)."""

    sampling: Sampling
    max_tokens: int | None = None
    stop_rule: StopRule | None = None
    cut_rule: CutRule | None = None


@dataclass
class PromptState:
    row: int  # the row holding the accepted prefix
    rng: random.Random
    prompt_reward: float = 0.0
    r_star: float | None = None
    unit: float = 1.0  # reward scale of beta: 1 with a given r_star, the first round's spread if calibrated
    fails: int = 0
    best: tuple[float, Segment, dict | None] | None = None  # best attempt since the last acceptance
    done: bool = False
    segments: list[int] = field(default_factory=list)  # accepted segment lengths
    rejections: list[int] = field(default_factory=list)  # rejections before each accepted segment
    trace: list[dict] = field(default_factory=list)
    reward: float | None = None
    tested: int = 0  # proposals tested so far (for the adaptive number of proposals)
    max_retries: int | None = None

    def proposals(self, most: int, adaptive: bool) -> int:
        """How many proposals to draw next round: about the expected number of tries to an
        acceptance, from this prompt's own history (Laplace-smoothed), at most `most`."""
        if not adaptive or self.r_star is None:  # calibrating r_star wants the full first round
            return most
        rate = (len(self.segments) + 1) / (self.tested + 2)
        return max(1, min(most, math.ceil(1 / rate), self.remaining_tries()))

    def remaining_tries(self) -> int:
        return 10**9 if self.max_retries is None else self.max_retries + 1 - self.fails


Threshold = Callable[[PromptState, int], float]  # (state, tokens written incl. the proposal) -> threshold


@dataclass
class RejectionSampler:
    job: Job
    proposal: Proposal
    threshold: Threshold
    beta: float
    proposals: int
    max_retries: int
    acceptance: str = "soft"
    r_star: float | None = None  # None: calibrate per prompt from its first round
    margin: float = 1.0
    trace: bool = False
    adaptive: bool = True  # draw about as many proposals as this prompt's acceptance rate needs

    def run(self) -> list[Result]:
        job = self.job
        batch = job.start()
        states = [PromptState(row=p, rng=random.Random(derive_seed(seed, "accept")), max_retries=self.max_retries)
                  for p, seed in enumerate(job.seeds)]
        for state, reward in zip(states, job.score(range(len(states)), [""] * len(states))):
            state.prompt_reward, state.r_star = reward, self.r_star
        answers: dict[int, tuple] = {}
        while True:
            for p, state in enumerate(states):
                if state.done:
                    continue
                if batch.is_cancelled(p):  # its client has gone: stop with what it has
                    batch.finish[state.row] = batch.finish[state.row] or "cancelled"
                if batch.finish[state.row] is not None:  # the accepted prefix ends the answer
                    state.done = True
                    answers[p] = (job.candidate(batch, state.row, state.reward), list(batch.logprobs[state.row]))
            active = [p for p, s in enumerate(states) if not s.done]
            if not active:
                break
            counts = [states[p].proposals(self.proposals, self.adaptive) for p in active]
            batch.select([states[p].row for p, k in zip(active, counts) for _ in range(k)])  # fork proposals
            segments = batch.extend(self.proposal.sampling, max_tokens=self.proposal.max_tokens,
                                    stop_rule=self.proposal.stop_rule, cut_rule=self.proposal.cut_rule)
            scores = job.score(batch.prompt_of, [batch.text(r) for r in range(batch.size)])
            restore: dict[int, Segment] = {}
            first = 0
            for p, k in zip(active, counts):
                rows = range(first, first + k)
                first += k
                self._decide(states[p], batch, [segments[r] for r in rows], [scores[r] for r in rows], restore)
            if restore:  # fallback to a best attempt of an earlier round: write it back
                batch.force(restore)
                for row in restore:
                    job.publish(batch.prompt_of[row], batch.text(row))
        return [job.result(p, batch, answer, logprobs, trace=states[p].trace if self.trace else None,
                           extra_stats=self._stats(states[p]))
                for p, (answer, logprobs) in sorted(answers.items())]

    def _decide(self, state: PromptState, batch: Batch, segments: list[Segment], scores: list[float],
                restore: dict[int, Segment]) -> None:
        """Test this round's proposals in order; set state.row to the row that holds the new prefix."""
        if state.r_star is None:
            state.r_star, state.unit = calibrate(scores, self.margin)
        prefix = segments[0].start
        for segment, reward in zip(segments, scores):
            state.tested += 1
            threshold = self.threshold(state, prefix + len(segment.tokens))
            fallback = state.fails >= self.max_retries
            p_accept = accept_probability(reward, threshold, self.beta * state.unit, self.acceptance)
            accepted = not fallback and state.rng.random() < p_accept
            entry = None
            if self.trace:
                entry = {"segment": len(state.segments), "attempt": state.fails + 1,
                         "text": self.job.engine.decode(segment.tokens), "tokens": len(segment.tokens),
                         "reward": reward, "threshold": threshold, "p_accept": p_accept, "accepted": accepted,
                         "fallback": fallback}
                state.trace.append(entry)
            if state.best is None or reward > state.best[0]:
                state.best = (reward, segment, entry)
            if fallback or accepted:
                chosen_reward, chosen, chosen_entry = state.best if fallback else (reward, segment, entry)
                if chosen_entry is not None:
                    chosen_entry["accepted"] = True
                state.segments.append(len(chosen.tokens))
                state.rejections.append(state.fails)
                state.fails, state.best, state.reward = 0, None, chosen_reward
                self._take(state, batch, segments, chosen, restore)
                if state.row not in restore:  # stream an accepted segment at once
                    self.job.publish(batch.prompt_of[state.row], batch.text(state.row))
                return
            state.fails += 1
        # every proposal rejected: go back to the prefix (its logits were kept; nothing is recomputed)
        state.row = segments[0].row
        batch.crop([state.row], [prefix])

    @staticmethod
    def _take(state: PromptState, batch: Batch, segments: list[Segment], chosen: Segment,
              restore: dict[int, Segment]) -> None:
        if any(chosen is s for s in segments):
            state.row = chosen.row
        else:
            state.row = segments[0].row
            batch.crop([state.row], [chosen.start])
            restore[state.row] = chosen

    @staticmethod
    def _stats(state: PromptState) -> dict:
        return {"segments": len(state.segments), "rejections": sum(state.rejections),
                "rejections_per_segment": (sum(state.rejections) / len(state.segments)) if state.segments else 0.0,
                "r_star": state.r_star, "reward_unit": state.unit, "prompt_reward": state.prompt_reward}


def check_common(alpha: float | None, beta: float, proposals: int, max_retries: int, acceptance: str,
                 temperature: float | None, top_k: int) -> None:
    if alpha is not None and not 0 <= alpha <= 1:
        raise DecalignError(f"alpha must be in [0, 1], got {alpha}")
    if not beta > 0:
        raise DecalignError(f"beta must be > 0, got {beta}")
    if temperature is not None and not temperature > 0:
        raise DecalignError(f"temperature must be > 0, got {temperature}")
    if proposals < 1:
        raise DecalignError(f"proposals must be >= 1, got {proposals}")
    if max_retries < 0:
        raise DecalignError(f"max_retries must be >= 0, got {max_retries}")
    if acceptance not in ("soft", "hard"):
        raise DecalignError(f"acceptance must be soft or hard, got {acceptance!r}")
    if top_k < 0:
        raise DecalignError(f"top_k must be >= 0, got {top_k}")
