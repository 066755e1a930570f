"""Blockwise value search: Controlled Decoding's blockwise best-of-K (Mudgal et al., arXiv:2310.17022).

    from the kept prefix, until the answer ends:
        sample `budget` continuations of `block` tokens (one row each, forked from the prefix)
        score each: the prefix value for a partial answer, the reward for a finished one
        keep the best (the first of equals) as the new prefix, on every row

With budget = 1 it is plain sampling, token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import Batch, Move, Segment
from .base import Search, SearchParams, param, register


@dataclass
class BlockwiseConfig(SearchParams):
    budget: int = param(8, "continuations sampled per block (K)")
    block: int = param(8, "tokens per block")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_counts("block")


@register("blockwise", BlockwiseConfig, needs_reward=True,
          summary="blockwise value search: best of K sampled blocks by value, block after block")
class BlockwiseSearch(Search):
    def begin(self, batch: Batch, rows: list[list[int]]) -> None:
        self.groups = [list(group) for group in rows]
        self.blocks = [0] * len(self.groups)
        self.segments: dict[int, Segment] = {}
        for group in self.groups:
            self.open(group)

    def moves(self) -> list[Move]:
        return self.stretch((r for p, group in enumerate(self.groups) if self.results[p] is None for r in group),
                            self.config.block)

    def react(self) -> None:
        job, batch = self.job, self.batch
        for p, group in enumerate(self.groups):
            if self.results[p] is not None or not self.stretched(group):
                continue
            scores = job.evaluate(batch, group)
            best = group[max(range(len(group)), key=lambda i: (scores[i], -i))]
            self.blocks[p] += 1
            job.publish(p, batch.text(best))  # a kept block is final
            if batch.finish[best] is not None:
                self.results[p] = job.result(p, batch, job.candidate(batch, best, scores[group.index(best)]),
                                             batch.logprobs[best], extra_stats={"blocks": self.blocks[p]})
                continue
            batch.copy_row(best, group)
            self.open(group)

    def live_rows(self) -> list[int]:
        return [r for p, group in enumerate(self.groups) if self.results[p] is None for r in group]

    def remap(self, new_row: dict[int, int]) -> None:
        self.groups = [[new_row[r] for r in group] if self.results[p] is None else []
                       for p, group in enumerate(self.groups)]
        self.move_segments(new_row)
