"""TreeBoN (Qiu et al., arXiv:2410.16033): Best-of-N grown as a tree, pruned layer by layer.

    start `budget` candidates per prompt (one prefill, forked)
    each layer:
        every unfinished candidate writes `segment` tokens
        a candidate that ends is a leaf, scored by the reward
        score the unfinished ones by the prefix value (else the reward's prefix scorer)
        keep the best budget // children as parents (the first of equals; fewer when the tree has
            fewer rows, after candidates ended early), prune the rest
        each parent branches into `children` candidates for the next layer
    answer: the leaf with the highest reward (the first of equals)

The paper scores partial answers with a DPO model's implicit reward; here the prefix value does that
job. With children = 1 nothing is pruned and it is Best-of-N token for token; with children = budget
it is blockwise value search that keeps every finished answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..engine import Batch, Move, Segment
from ..errors import DecalignError
from ..result import Candidate
from .base import Search, SearchParams, param, register


@dataclass
class TreeBoNConfig(SearchParams):
    budget: int = param(8, "candidates alive in each layer (the N of Best-of-N)")
    children: int = param(4, "children per kept parent: budget // children parents are kept at each layer "
                               "(fewer once candidates that ended leave too few rows)")
    segment: int = param(8, "tokens each candidate writes per layer")
    trace: bool = param(False, "keep each layer's scores and kept parents in the result's trace")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_counts("segment")
        if not 1 <= self.children <= self.budget:
            raise DecalignError(f"children must be in [1, budget = {self.budget}], got {self.children}")


@dataclass
class Tree:
    """One prompt's layer of candidates and the leaves (finished answers) found so far."""

    rows: list[int]
    leaves: list[tuple[Candidate, list[float]]] = field(default_factory=list)  # (answer, its logprobs)
    layers: int = 0
    pruned: int = 0
    trace: list[dict] = field(default_factory=list)


@register("treebon", TreeBoNConfig, needs_reward=True,
          summary="TreeBoN: Best-of-N as a tree, the best partial answers by value branch, the rest are pruned")
class TreeBoN(Search):
    def begin(self, batch: Batch, rows: list[list[int]]) -> None:
        self.trees = [Tree(rows=list(group)) for group in rows]
        self.segments: dict[int, Segment] = {}
        for tree in self.trees:
            self.open(tree.rows)

    def moves(self) -> list[Move]:
        return self.stretch((r for tree in self.trees for r in tree.rows), self.config.segment)

    def react(self) -> None:
        for p, tree in enumerate(self.trees):
            if tree.rows and self.stretched(tree.rows):
                self._grow(p, tree)

    def _grow(self, p: int, tree: Tree) -> None:
        job, batch = self.job, self.batch
        tree.layers += 1
        ended = [r for r in tree.rows if batch.finish[r] is not None]
        for row, reward in zip(ended, job.evaluate(batch, ended) if ended else []):
            tree.leaves.append((job.candidate(batch, row, reward), list(batch.logprobs[row])))
        unfinished = [r for r in tree.rows if batch.finish[r] is None]
        if not unfinished:
            tree.rows = []
            self.results[p] = self._answer(p, tree)
            return
        scores = job.evaluate(batch, unfinished)
        ranked = sorted(range(len(unfinished)), key=lambda i: -scores[i])  # stable: the first of equals
        # the tree's rows (budget at first) hold the children: fewer once a layer kept fewer parents
        # than budget // children because candidates ended (their rows left the tree)
        kept = sorted(ranked[:len(tree.rows) // self.config.children])
        tree.pruned += len(unfinished) - len(kept)
        if self.config.trace:
            tree.trace.append({"layer": tree.layers, "scores": scores, "kept": kept,
                               "texts": [batch.text(r) for r in unfinished]})
        parents = {unfinished[i] for i in kept}
        tree.rows = list(self.branch({r: self.config.children if r in parents else 0 for r in tree.rows}))
        self.open(tree.rows)

    def _answer(self, p: int, tree: Tree):
        best, logprobs = max(tree.leaves, key=lambda leaf: leaf[0].reward)  # max keeps the first of equals
        return self.job.result(p, self.batch, best, logprobs, candidates=[leaf for leaf, _ in tree.leaves],
                               trace=tree.trace if self.config.trace else None,
                               extra_stats={"layers": tree.layers, "pruned": tree.pruned})

    def live_rows(self) -> list[int]:
        return [r for tree in self.trees for r in tree.rows]

    def remap(self, new_row: dict[int, int]) -> None:
        for tree in self.trees:
            tree.rows = [new_row[r] for r in tree.rows]
        self.move_segments(new_row)
