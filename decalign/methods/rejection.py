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
for the longest proposal of a round; an accepted one is copied onto the prompt's other slots. The
best rejected attempt keeps its row until a better one comes (the others draw on), so falling back
to it costs nothing; with one slot per prompt it is cropped like the rest and written back.

How many of a prompt's slots draw at once is a separate choice (`parallel`): the others wait idle
(a decode step skips idle rows) and start as soon as a drawing slot is done. Fewer at once throw
away fewer tokens (a proposal still running when an earlier one is accepted was wasted work), in
more steps; the answers' distribution is the same, since it never depended on how many run at once.
Two exceptions cost nothing: the first K proposals, which calibrate r_star, all draw at once (all
are scored before any is tested), and after the first acceptance a prompt keeps only `parallel` + 1
slots (the extra one holds the best rejected attempt).

Prompts are independent: each has its own slots, retry count, best attempt and random streams, and
a prompt's rows move one token per step whatever the other prompts do, so a prompt's answer does
not depend on its batch.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
from dataclasses import dataclass, field

from ..engine import Batch, Move, Sample, Segment
from ..errors import DecalignError
from ..sampling import Sampling, derive_seed
from .base import Method, param


def accept_probability(reward: float, threshold: float, beta: float, rule: str = "soft") -> float:
    """Soft: min(1, exp((r - threshold) / beta)); hard: 1 if r >= threshold else 0."""
    if rule == "hard":
        return 1.0 if reward >= threshold else 0.0
    return math.exp(min(0.0, (reward - threshold) / beta))


def calibrate(rewards: list[float], margin: float) -> tuple[float, float]:
    """(r_star, unit) from a prompt's first proposals: r_star is their mean plus `margin` standard
    deviations, and the unit (their standard deviation) is the scale beta is measured in."""
    try:
        spread = statistics.pstdev(rewards) if len(rewards) > 1 else 0.0
        mean = statistics.fmean(rewards)
    except OverflowError:
        spread = mean = math.inf
    if not math.isfinite(mean + margin * spread):  # finite scores near the float maximum
        raise DecalignError(f"rewards too large to calibrate r_star from (up to {max(map(abs, rewards)):.3g}); "
                            f"scale the reward down or set r_star")
    unit = spread if spread > 1e-6 else 1.0
    return mean + margin * spread, unit


@dataclass
class RejectionParams:
    """What every rejection sampler takes. Defaults follow the CARDS code: beta 0.7 (also the
    sampling temperature), top_k 40, best of 21 after 20 rejections."""

    r_star: float | None = param(None, "target reward; None = calibrated per prompt (mean + margin * std of round 1)")
    beta: float = param(0.7, "acceptance temperature (also the sampling temperature unless temperature is set)")
    temperature: float | None = param(None, "sampling temperature; None = beta, as in the paper")
    top_k: int = param(40, "top-k of the proposals (0 = off)")
    max_retries: int = param(20, "rejections before the best attempt is taken")
    proposals: int = param(4, "slots per prompt: proposals in flight, tested in the order they start (the first "
                              "K also calibrate r_star)")
    parallel: int | None = param(None, "slots of a prompt that draw at once (None = all): fewer waste fewer tokens "
                                       "in more steps, with the same answer distribution")
    acceptance: str = param("soft", "soft: accept with min(1, exp((r - threshold) / beta)); hard: r >= threshold")
    margin: float = param(1.0, "calibration: r_star = mean + margin * std of the first proposals' scores")
    trace: bool = param(False, "keep every attempt in the result's trace")

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise DecalignError(f"beta must be > 0, got {self.beta}")
        if self.temperature is not None and not self.temperature > 0:
            raise DecalignError(f"temperature must be > 0, got {self.temperature}")
        if self.proposals < 1:
            raise DecalignError(f"proposals must be >= 1, got {self.proposals}")
        if self.parallel is not None and not 1 <= self.parallel <= self.proposals:
            raise DecalignError(f"parallel must be between 1 and proposals ({self.proposals}), got {self.parallel}")
        if self.max_retries < 0:
            raise DecalignError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.acceptance not in ("soft", "hard"):
            raise DecalignError(f"acceptance must be soft or hard, got {self.acceptance!r}")
        if self.top_k < 0:
            raise DecalignError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.beta if self.temperature is None else self.temperature, top_k=self.top_k)


IDLE = math.inf  # the test-order number of a slot that waits to draw (after every real proposal)


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
    idle: list[int] = field(default_factory=list)  # slots waiting to draw, in the order they became free


class RejectionSampler(Method):
    """The loop shared by CARDS and item-level RS. A subclass gives the proposal rule and the
    threshold; its config gives beta, proposals, max_retries, acceptance, r_star, margin and trace."""

    def proposal(self) -> Sample:
        """How a proposal is drawn: a Sample move without segments (a segment rule for CARDS)."""
        raise NotImplementedError

    def threshold(self, state: PromptState, tokens: int) -> float:
        """The acceptance threshold for a proposal that brings the answer to `tokens` tokens."""
        raise NotImplementedError

    def rows_per_prompt(self) -> int:
        return self.config.proposals

    def begin(self, batch: Batch, rows: list[list[int]]) -> None:
        self.rule = self.proposal()
        self.states = [PromptState(rows=list(group), rng=random.Random(derive_seed(seed, "accept")),
                                   r_star=self.config.r_star)
                       for group, seed in zip(rows, self.job.seeds)]
        for state, reward in zip(self.states, self.job.evaluate(batch, [s.rows[0] for s in self.states])):
            state.prompt_reward = reward
        self.slots: dict[int, tuple[float, Segment]] = {}  # row -> (proposal number or IDLE, its proposal)
        self.scores: dict[int, float] = {}  # row -> score of its finished proposal
        self.drawn = [0] * len(self.states)  # proposals started, per prompt: the test order
        for p, state in enumerate(self.states):
            self._start_proposals(p, state.rows)

    def _start_proposals(self, p: int, rows: list[int], new_prefix: bool = False) -> None:
        """Start proposals on `rows` (free slots at the accepted prefix), as many as `parallel`
        allows; the rest wait idle, in this order, for `_top_up`."""
        state = self.states[p]
        room = self._room(state, rows)
        started, waiting = rows[:room], rows[room:]
        for row, segment in zip(started, self.batch.open_segments(started, forget_earlier=new_prefix)):
            self.slots[row] = (self.drawn[p], segment)
            self.drawn[p] += 1
        for row, segment in zip(waiting, self.batch.open_segments(waiting, forget_earlier=new_prefix, croppable=False)):
            segment.reason = "idle"
            self.slots[row] = (IDLE, segment)
            state.idle.append(row)
        for row in rows:
            self.scores.pop(row, None)

    def _room(self, state: PromptState, rows: list[int]) -> int:
        """How many of `rows` may start drawing, given the prompt's other slots that draw. While
        r_star is calibrated every slot draws: the first K proposals are all drawn and scored before
        any is tested, so drawing them one at a time would only add steps."""
        if self.config.parallel is None or state.r_star is None:
            return len(rows)
        drawing = sum(1 for r in state.rows if r not in rows and r in self.slots and not self.slots[r][1].reason)
        return max(0, self.config.parallel - drawing)

    def _top_up(self, p: int, state: PromptState) -> None:
        """Start waiting slots while fewer than `parallel` of the prompt's slots draw."""
        room = self._room(state, state.idle) if state.idle and not state.done else 0
        if room:
            starting, state.idle = state.idle[:room], state.idle[room:]
            self._start_proposals(p, starting)

    def moves(self) -> list[Move]:
        for p, state in enumerate(self.states):
            if not state.done and self.job.is_cancelled(p):  # its client has gone: stop with what it has
                self._finish(state, "cancelled")
        running = [self.slots[r][1] for s in self.states if not s.done for r in s.rows if not self.slots[r][1].reason]
        if not running:
            return []
        return [dataclasses.replace(self.rule, segments=running)]

    def react(self) -> None:
        live = [p for p, s in enumerate(self.states) if not s.done]
        # score each prompt's finished proposals that come next in test order (one scoring call)
        waiting = [r for p in live for r in self._next_in_order(self.states[p]) if r not in self.scores]
        if waiting:
            self.scores.update(zip(waiting, self.job.evaluate(self.batch, waiting)))
        restore: dict[int, Segment] = {}
        for p in live:
            self._decide(p, self.states[p], restore)
        if restore:  # fallback to an attempt whose row has moved on: write it back, then copy it
            self.batch.force(restore)
            for row in restore:
                self._accepted(self.states[self.job.prompt_of(self.batch, row)], row)
        for p in live:
            self._top_up(p, self.states[p])
        if all(s.done for s in self.states):
            self.results[:] = [self.job.result(p, self.batch, *state.answer,
                                               trace=state.trace if self.config.trace else None,
                                               extra_stats=self._stats(state))
                               for p, state in enumerate(self.states)]

    def live_rows(self) -> list[int]:
        return [r for s in self.states if not s.done for r in s.rows]

    def remap(self, new_row: dict[int, int]) -> None:
        for state in self.states:
            state.rows = [new_row[r] for r in state.rows] if not state.done else []
            state.idle = [new_row[r] for r in state.idle] if not state.done else []
        self.slots = {new_row[r]: v for r, v in self.slots.items() if r in new_row}
        self.scores = {new_row[r]: v for r, v in self.scores.items() if r in new_row}
        for row, (_, segment) in self.slots.items():
            segment.row = row

    def _next_in_order(self, state: PromptState) -> list[int]:
        """The prompt's rows whose proposals have finished and come next in test order (up to the
        first one still running)."""
        rows, held = [], self._held_row(state)
        for row in sorted(state.rows, key=lambda r: self.slots[r][0]):
            if row == held:  # tested already: it only waits to be chosen or beaten
                continue
            if self.slots[row][1].reason in ("", "cancelled", "superseded", "idle"):  # idle slots sort last
                break
            rows.append(row)
        return rows

    def _held_row(self, state: PromptState) -> int | None:
        """The row still holding the best rejected attempt (with several slots it is kept, not
        cropped), or None."""
        if state.best is None:
            return None
        return next((r for r in state.rows if self.slots[r][1] is state.best[1]), None)

    def _decide(self, p: int, state: PromptState, restore: dict) -> None:
        """Test the prompt's scored proposals in order, until one is taken or one is not yet scored."""
        config, slots, scores = self.config, self.slots, self.scores
        if state.r_star is None:  # calibration: r_star from the scores of the first K proposals
            first = [r for r in state.rows if slots[r][0] < len(state.rows) and r in scores]
            if len(first) < len(state.rows):
                return
            state.r_star, state.unit = calibrate([scores[r] for r in first], config.margin)
        for row in self._next_in_order(state):
            if row not in scores:
                return
            segment, reward = slots[row][1], scores[row]
            threshold = self.threshold(state, segment.start + len(segment.tokens))
            fallback = state.fails >= config.max_retries
            p_accept = accept_probability(reward, threshold, config.beta * state.unit, config.acceptance)
            accepted = not fallback and state.rng.random() < p_accept
            entry = None
            if config.trace:
                entry = {"segment": len(state.segments), "attempt": state.fails + 1,
                         "text": self.job.engine.decode(segment.tokens), "tokens": len(segment.tokens),
                         "reward": reward, "threshold": threshold, "p_accept": p_accept, "accepted": accepted,
                         "fallback": fallback}
                state.trace.append(entry)
            held = self._held_row(state)  # the previous best's row, before this attempt may beat it
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
                    self._accepted(state, row)
                elif held is not None:  # the best attempt waits on its own row
                    self._accepted(state, held)
                else:  # the best attempt's row has moved on (one slot per prompt): write it back on this row
                    self.batch.crop([row], [chosen.start])
                    restore[row] = chosen
                    for other in state.rows:  # nothing runs until the prefix is restored
                        slots[other][1].reason = slots[other][1].reason or "superseded"
                        scores.pop(other, None)
                return
            state.fails += 1
            if state.best[1] is segment and len(state.rows) > 1:  # the best so far: keep it on its row
                if held is None:
                    continue
                row = held  # the attempt it beat gives its row back
            self.batch.crop([row], [slots[row][1].start])  # back to the prefix; its logits were kept
            self._start_proposals(p, [row])

    def _accepted(self, state: PromptState, row: int) -> None:
        """`row` holds the new accepted prefix: end the answer there, or copy it onto every slot
        (in-flight proposals are dropped unseen) and start new proposals from it."""
        batch = self.batch
        p = self.job.prompt_of(batch, row)
        self.job.publish(p, batch.text(row))
        if batch.finish[row] is not None:
            state.done = True
            state.answer = (self.job.candidate(batch, row, state.reward), list(batch.logprobs[row]))
            return
        state.rows = self._slots_to_keep(state, row)
        batch.copy_row(row, state.rows)
        state.idle = []
        self._start_proposals(p, state.rows, new_prefix=True)  # nothing is ever cropped back past it

    def _slots_to_keep(self, state: PromptState, row: int) -> list[int]:
        """`row` and the slots the prompt still needs: once r_star is known, `parallel` that draw and
        one that holds the best rejected attempt. The others leave the prompt (the batch drops rows
        that no method lists), so they are not copied onto nor carried through every step."""
        if self.config.parallel is None:
            return state.rows
        keep = [row] + [r for r in state.rows if r != row][:self.config.parallel]
        for r in state.rows:
            if r not in keep:
                self.slots.pop(r, None)
                self.scores.pop(r, None)
        return keep

    def _finish(self, state: PromptState, reason: str) -> None:
        """End a prompt early with its accepted prefix."""
        batch, row = self.batch, state.rows[0]
        batch.crop([row], [state.prefix_tokens])
        batch.finish[row] = reason
        state.done = True
        state.answer = (self.job.candidate(batch, row, state.reward), list(batch.logprobs[row]))

    @staticmethod
    def _stats(state: PromptState) -> dict:
        return {"segments": len(state.segments), "rejections": sum(state.rejections),
                "rejections_per_segment": (sum(state.rejections) / len(state.segments)) if state.segments else 0.0,
                "r_star": state.r_star, "reward_unit": state.unit, "prompt_reward": state.prompt_reward}
