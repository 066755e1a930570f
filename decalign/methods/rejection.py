"""Reward rejection sampling with parallel proposals: the loop that CARDS and item-level RS share.

The sequential algorithm (the papers'): from the accepted prefix, draw a proposal, score it, accept
it with probability min(1, exp((r - threshold) / beta)); after `max_retries` rejections take the
best attempt. Here each prompt keeps K rows ("slots") drawing proposals from its prefix all the
time, numbered in the order they start, and the proposals are tested *in that order*: a finished
proposal waits until every earlier one has been rejected. Each proposal is drawn from the prefix with
fresh randomness, and one still running when an earlier one is accepted is thrown away unseen, so the
accepted text has exactly the sequential algorithm's distribution; K only changes how many draws
run at once. Scheduling is continuous: a rejected slot is cropped back to the prefix (its saved
logits: nothing is recomputed) and starts its next proposal at the very next step, so no row waits
for the longest proposal of a round; an accepted one is copied onto the prompt's other slots.

Prompts are independent: each has its own slots, retry count, best attempt and random streams, and
a prompt's rows move one token per step whatever the other prompts do, so a prompt's answer does
not depend on its batch.
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
    rows: list[int]  # this prompt's slots: rows drawing proposals from the accepted prefix
    rng: random.Random
    prompt_reward: float = 0.0
    r_star: float | None = None
    unit: float = 1.0  # reward scale of beta: 1 with a given r_star, the first proposals' spread if calibrated
    fails: int = 0
    best: tuple[float, Segment, dict | None] | None = None  # best attempt since the last acceptance
    done: bool = False
    segments: list[int] = field(default_factory=list)  # accepted segment lengths
    rejections: list[int] = field(default_factory=list)  # rejections before each accepted segment
    trace: list[dict] = field(default_factory=list)
    reward: float | None = None  # the accepted prefix's reward (None before the first acceptance)
    prefix_tokens: int = 0  # the accepted prefix's length
    answer: tuple | None = None  # (Candidate, logprobs) once the answer is complete


Threshold = Callable[[PromptState, int], float]  # (state, tokens written incl. the proposal) -> threshold


@dataclass
class RejectionSampler:
    job: Job
    proposal: Proposal
    threshold: Threshold
    beta: float
    proposals: int  # K: slots per prompt, proposals running at once
    max_retries: int
    acceptance: str = "soft"
    r_star: float | None = None  # None: calibrate per prompt from its first K proposals
    margin: float = 1.0
    trace: bool = False

    def run(self) -> list[Result]:
        job, k = self.job, self.proposals
        batch = job.start(n=k)
        states = [PromptState(rows=list(range(p * k, (p + 1) * k)),
                              rng=random.Random(derive_seed(seed, "accept")), r_star=self.r_star)
                  for p, seed in enumerate(job.seeds)]
        for state, reward in zip(states, job.evaluate(batch, [s.rows[0] for s in states])):
            state.prompt_reward = reward
        slots: dict[int, tuple[int, Segment]] = {}  # row -> (proposal number, its proposal)
        scores: dict[int, float] = {}  # row -> reward of its finished proposal
        drawn = [0] * len(states)  # proposals started, per prompt: the test order

        def start_proposals(p: int, rows: list[int], new_prefix: bool = False) -> None:
            for row, segment in zip(rows, batch.open_segments(rows, forget_earlier=new_prefix)):
                slots[row] = (drawn[p], segment)
                scores.pop(row, None)
                drawn[p] += 1

        for p, state in enumerate(states):
            start_proposals(p, state.rows)
        while True:
            for p, state in enumerate(states):
                if not state.done and batch.is_cancelled(p):  # its client has gone: stop with what it has
                    self._finish(state, batch, "cancelled")
            live = [p for p, s in enumerate(states) if not s.done]
            if not live:
                break
            running = [slots[r][1] for p in live for r in states[p].rows if not slots[r][1].reason]
            if running:
                batch.step(running, self.proposal.sampling, max_tokens=self.proposal.max_tokens,
                           stop_rule=self.proposal.stop_rule, cut_rule=self.proposal.cut_rule)
            # score each prompt's finished proposals that come next in test order (one reward call)
            waiting = [r for p in live for r in self._next_in_order(states[p], slots) if r not in scores]
            if waiting:
                scores.update(zip(waiting, job.evaluate(batch, waiting)))
            restore: dict[int, Segment] = {}
            for p in live:
                self._decide(states[p], batch, slots, scores, restore, start_proposals)
            if restore:  # fallback to an attempt whose row has moved on: write it back, then copy it
                batch.force(restore)
                for row in restore:
                    self._accepted(states[batch.prompt_of[row]], batch, row, start_proposals)
            idle = sum(len(s.rows) for s in states if s.done)
            if idle and 4 * idle >= batch.size:
                self._drop_finished(states, batch, slots, scores)
        return [job.result(p, batch, *state.answer, trace=state.trace if self.trace else None,
                           extra_stats=self._stats(state))
                for p, state in enumerate(states)]

    @staticmethod
    def _next_in_order(state: PromptState, slots: dict) -> list[int]:
        """The prompt's rows whose proposals have finished and come next in test order (up to the
        first one still running)."""
        rows = []
        for row in sorted(state.rows, key=lambda r: slots[r][0]):
            if slots[row][1].reason in ("", "cancelled", "superseded"):
                break
            rows.append(row)
        return rows

    def _decide(self, state: PromptState, batch: Batch, slots: dict, scores: dict, restore: dict,
                start_proposals: Callable) -> None:
        """Test the prompt's scored proposals in order, until one is taken or one is not yet scored."""
        if state.done:
            return
        p = batch.prompt_of[state.rows[0]]
        if state.r_star is None:  # calibration: r_star from the rewards of the first K proposals
            first = [r for r in state.rows if slots[r][0] < len(state.rows) and r in scores]
            if len(first) < len(state.rows):
                return
            state.r_star, state.unit = calibrate([scores[r] for r in first], self.margin)
        for row in self._next_in_order(state, slots):
            if row not in scores:
                return
            segment, reward = slots[row][1], scores[row]
            threshold = self.threshold(state, segment.start + len(segment.tokens))
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
                state.prefix_tokens = chosen.start + len(chosen.tokens)
                if chosen is segment:
                    self._accepted(state, batch, row, start_proposals)
                else:  # the best attempt's row has moved on: write it back on this row
                    batch.crop([row], [chosen.start])
                    restore[row] = chosen
                    for other in state.rows:  # nothing runs until the prefix is restored
                        slots[other][1].reason = slots[other][1].reason or "superseded"
                        scores.pop(other, None)
                return
            state.fails += 1
            batch.crop([row], [segment.start])  # back to the prefix; its logits were kept
            start_proposals(p, [row])

    def _accepted(self, state: PromptState, batch: Batch, row: int, start_proposals: Callable) -> None:
        """`row` holds the new accepted prefix: end the answer there, or copy it onto every slot
        (in-flight proposals are dropped unseen) and start new proposals from it."""
        p = batch.prompt_of[row]
        self.job.publish(p, batch.text(row))
        if batch.finish[row] is not None:
            state.done = True
            state.answer = (self.job.candidate(batch, row, state.reward), list(batch.logprobs[row]))
            return
        batch.copy_row(row, state.rows)
        start_proposals(p, state.rows, new_prefix=True)  # nothing is ever cropped back past it

    def _finish(self, state: PromptState, batch: Batch, reason: str) -> None:
        """End a prompt early with its accepted prefix."""
        row = state.rows[0]
        batch.crop([row], [state.prefix_tokens])
        batch.finish[row] = reason
        state.done = True
        state.answer = (self.job.candidate(batch, row, state.reward), list(batch.logprobs[row]))

    @staticmethod
    def _drop_finished(states: list[PromptState], batch: Batch, slots: dict, scores: dict) -> None:
        """Take the rows of finished prompts out of the batch: they would still cost a row per step."""
        keep = [r for s in states if not s.done for r in s.rows]
        if not keep:
            return
        new_index = {old: new for new, old in enumerate(keep)}
        batch.select(keep)
        for state in states:
            state.rows = [new_index[r] for r in state.rows] if not state.done else []
        moved_slots = {new_index[r]: v for r, v in slots.items() if r in new_index}
        moved_scores = {new_index[r]: v for r, v in scores.items() if r in new_index}
        slots.clear(), slots.update(moved_slots)
        scores.clear(), scores.update(moved_scores)
        for row, (_, segment) in slots.items():
            segment.row = row

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
