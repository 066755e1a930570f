"""The contrastive family's shared step, as a step machine; each configuration is its own module.

At every step each prompt has a few *branches*: rows that hold the same tokens but see them through
different weights (the model with its LoRA adapter, the same weights without it, another model).
The step combines their raw next-token logits s_k with fixed weights w_k,

    score[i] = sum_k w_k * s_k[i]     on the plausible set {i : s_h[i] >= log(alpha) + max s_h}

of a head branch h (-inf elsewhere), picks argmax(score) (or draws from softmax(score / T) when
temperature > 0), and appends the chosen token to every branch's row. With a `gate`, a step
is contrasted only where the head branch is unsure (its two most likely tokens within `gate` nats);
elsewhere the head branch's own scores (on the plausible set) stand, so a confident adapter is never
overruled. Per-row constants (log Z) cancel in the argmax and the softmax, so raw logits and
log-probabilities give the same tokens.

Configurations: cold.py (CoLD), contrastive.py (a separate amateur model), dexperts.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from ..engine import BASE, Batch, BatchPrompt, Engine, Move, Segment, Write
from ..errors import DecalignError
from ..result import Result
from ..sampling import Sampling, choose_tokens
from .base import Job, Method, missing_adapter, param


# ----- the shared step --------------------------------------------------------------------------
def plausible_set(logits: torch.Tensor, alpha: float, best: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the tokens whose logit is within log(alpha) of the row's best (`best`, rows x 1,
    when the caller has it already)."""
    if best is None:
        best = logits.max(-1, keepdim=True).values
    return logits >= math.log(alpha) + best


def contrast_scores(logits: Sequence[torch.Tensor], weights: Sequence[float], *, head: int = 0,
                    alpha: float = 0.1, plausible: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, plausible) for rows x vocab logits of each branch: the weighted sum of the branches'
    logits on the head branch's plausible set (given, or computed from `alpha`), -inf outside it.
    Branches with weight 0 are skipped, so a zero weight never turns an infinite logit into NaN."""
    target = logits[head].float()
    if plausible is None:
        plausible = plausible_set(target, alpha)
    score = None
    for weight, branch in zip(weights, logits):
        if weight == 0:
            continue
        term = branch.float() if weight == 1 else weight * branch.float()
        score = term if score is None else score + term
    if score is None:
        score = torch.zeros_like(target)
    return score.masked_fill(~plausible, float("-inf")), plausible


def _fit(logits: torch.Tensor, width: int) -> torch.Tensor:
    """Match a branch's vocabulary width to the head's: extra ids are dropped, missing ids get the
    row's minimum (a finite floor, never -inf, so -weight * logit cannot become +inf)."""
    if logits.shape[-1] == width:
        return logits
    if logits.shape[-1] > width:
        return logits[:, :width]
    floor = logits.min(-1, keepdim=True).values.expand(-1, width - logits.shape[-1])
    return torch.cat([logits, floor], dim=-1)


@dataclass
class Branch:
    """One branch: prompt p's row is `rows[p]` of `batch` (the shared batch, or a private one for a
    separate model); its logits enter the score with `weight`."""

    weight: float
    adapter: str | None = None  # the adapter its rows run with
    engine: Engine | None = None  # a separate model (its own batch), None for the shared batch
    batch: Batch | None = None
    rows: list[int] = field(default_factory=list)
    pending: list[list[int]] = field(default_factory=list)  # per prompt: chosen tokens its private row has not read


class Contrast(Method):
    """The contrastive step as a machine: every step combines the branches' logits and writes the
    chosen token on every branch's row; branch 0 holds the answers, the head branch (in the shared
    batch) sets the plausible set and the gate. Subclasses set `branches()`.

    A branch with a batch of its own reads the chosen tokens lazily: they wait in `pending` until a
    step needs its logits (without a gate, every step; with one, only steps where some prompt's head
    branch is unsure), and then all its rows catch up in one forward pass."""

    head = 0

    def branches(self) -> list[Branch]:
        raise NotImplementedError

    def batch_prompts(self) -> list[BatchPrompt]:
        self.parts = self.branches()
        job = self.job
        return [job.batch_prompt(ids, seed, 1, branch.adapter)
                for branch in self.parts if branch.engine is None
                for ids, seed in zip(job.prompt_ids, job.seeds)]

    def begin(self, batch: Batch, rows: list[list[int]]) -> None:
        job, count = self.job, len(self.job.prompts)
        shared = iter(rows)
        for branch in self.parts:
            if branch.engine is None:
                branch.batch, branch.rows = batch, [next(shared)[0] for _ in range(count)]
            else:  # a batch of its own, fed the shared batch's chosen tokens as its logits are needed
                # (its model as loaded, or the branch's adapter: the job's adapter is the shared model's)
                branch.batch = branch.engine.open([replace(job.batch_prompt(ids, seed, 1), adapter=branch.adapter)
                                                   for ids, seed in zip(job.prompt_ids, job.seeds)])
                branch.rows, branch.pending = list(range(count)), [[] for _ in range(count)]
                if job.cancelled is not None:
                    branch.batch.cancelled = job.is_cancelled
        self.steps, self.flips, self.plausible_sizes = [0] * count, [0] * count, [0] * count
        self.live = list(range(count))

    def catch_up(self) -> None:
        """Feed every private row the chosen tokens it has not read yet, one forward pass per batch."""
        for b in self.parts:
            if b.batch is not self.batch and any(b.pending[p] for p in self.live):
                b.batch.force({b.rows[p]: Segment(row=b.rows[p], start=len(b.batch.tokens[b.rows[p]]),
                                                  tokens=b.pending[p], logprobs=[math.nan] * len(b.pending[p]),
                                                  entropies=[math.nan] * len(b.pending[p]))
                               for p in self.live if b.pending[p]})
                for p in self.live:
                    b.pending[p] = []

    def moves(self) -> list[Move]:
        primary, head = self.parts[0], self.parts[self.head]
        head_logits = head.batch.next_logits([head.rows[p] for p in self.live]).float()
        width = head_logits.shape[-1]
        # one pass for the best two: the plausible set's bar, the head's own choice, and the gate's
        # margin (a difference of log-probabilities is the same difference of logits)
        top2 = head_logits.topk(min(2, width), dim=-1)
        plausible = plausible_set(head_logits, self.config.alpha, best=top2.values[:, :1])
        score = head_logits.masked_fill(~plausible, float("-inf"))  # the head branch's own choice ...
        unsure = torch.ones(len(self.live), dtype=torch.bool, device=score.device)
        if self.config.gate is not None and width > 1:  # ... stands where it is sure: its two best `gate` nats apart
            unsure = (top2.values[:, 0] - top2.values[:, 1]) < self.config.gate
        if unsure.any():  # elsewhere the contrast decides
            self.catch_up()
            contrasted = [p for p, u in zip(self.live, unsure.tolist()) if u]
            logits = [_fit(b.batch.next_logits([b.rows[p] for p in contrasted]), width) for b in self.parts]
            score[unsure] = contrast_scores(logits, [b.weight for b in self.parts], head=self.head,
                                            plausible=plausible[unsure])[0]
        primary_rows = [primary.rows[p] for p in self.live]
        score = primary.batch.mask_early_eos(primary_rows, score)
        chosen = choose_tokens(score, self.config.sampling,
                               [primary.batch.generators[r] for r in primary_rows]).tolist()
        own = top2.indices[:, 0].tolist()
        sizes = plausible.sum(-1).tolist()
        for i, p in enumerate(self.live):
            self.steps[p] += 1
            self.flips[p] += chosen[i] != own[i]
            self.plausible_sizes[p] += sizes[i]
            for b in self.parts:
                if b.batch is not self.batch:
                    b.pending[p].append(chosen[i])
        return [Write({b.rows[p]: chosen[i] for b in self.parts if b.batch is self.batch
                       for i, p in enumerate(self.live)})]

    def react(self) -> None:
        primary = self.parts[0]
        for p in self.live:  # every chosen token is final: stream it
            self.job.publish(p, primary.batch.text(primary.rows[p]))
        self.live = [p for p in self.live if primary.batch.finish[primary.rows[p]] is None]
        if not self.live:
            self.results[:] = self._results()
            self.close()

    def _results(self) -> list[Result]:
        job, primary = self.job, self.parts[0]
        results = job.results(primary.batch, primary.rows)
        for p, result in enumerate(results):
            works = [b.batch.work[b.batch.prompt_of[b.rows[p]]] for b in self.parts]
            passes: dict[int, int] = {}
            for b, work in zip(self.parts, works):  # rows of one batch share its forward passes
                passes[id(b.batch)] = max(passes.get(id(b.batch), 0), work.forward_passes)
            result.stats.update(
                forward_passes=sum(passes.values()),
                prefill_tokens=sum(w.prefill_tokens for w in works),
                decode_tokens=sum(w.decode_tokens for w in works),
                branches=len(self.parts),
                contrast_flips=self.flips[p],  # steps whose token differs from the head branch's own argmax
                plausible_mean=self.plausible_sizes[p] / max(self.steps[p], 1),
            )
        return results

    def live_rows(self) -> list[int]:
        return [b.rows[p] for b in self.parts if b.batch is self.batch for p in range(len(self.job.prompts))]

    def remap(self, new_row: dict[int, int]) -> None:
        for b in self.parts:
            if b.batch is self.batch:
                b.rows = [new_row[r] for r in b.rows]


# ----- what every configuration takes ------------------------------------------------------
@dataclass
class ContrastParams:
    """alpha: plausibility mask (0, 1]; beta >= 0: contrast strength; temperature 0 = greedy."""

    alpha: float = param(0.1, "plausibility mask: tokens within log(alpha) of the head branch's best")
    beta: float = param(0.5, "contrast strength (>= 0; 0 = greedy decoding of the expert)")
    temperature: float = param(0.0, "0 = argmax of the contrast score; > 0 samples from it")
    top_p: float = param(1.0, "nucleus filter of the contrast distribution (1 = off)")
    gate: float | None = param(None, "contrast only at steps where the head branch's two most likely tokens are "
                                     "within this many nats (none = every step, the papers' rule)")

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise DecalignError(f"alpha must be in (0, 1], got {self.alpha}")
        if not (self.beta >= 0 and math.isfinite(self.beta)):  # an infinite beta scores every token +-inf
            raise DecalignError(f"beta must be a finite number >= 0, got {self.beta}")
        if self.gate is not None and not self.gate >= 0:
            raise DecalignError(f"gate must be >= 0 (or none: contrast every step), got {self.gate}")
        self.sampling  # validates temperature and top_p

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, 0, self.top_p)


def active_adapter(job: Job, method: str) -> str:
    """The adapter a job's expert rows run with: the job's own, else the model's as loaded."""
    name = job.engine.active_adapter() if job.adapter is None else job.adapter
    if name == BASE:
        raise missing_adapter(method)
    return name
