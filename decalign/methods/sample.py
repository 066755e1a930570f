"""Ancestral sampling with temperature, top-k and top-p; the machine behind greedy and Best-of-N.

    every row: sample a token from its next-token distribution until the answer ends
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import Batch, Move, Sample
from ..sampling import Sampling
from .base import Method, SamplingParams, register


class WholeAnswers(Method):
    """Every row writes a whole answer under one sampling rule; one answer per prompt."""

    streams_tokens = True

    def sampling(self) -> Sampling:
        return self.config.sampling

    def begin(self, batch: Batch, rows: list[list[int]]) -> None:
        self.segments = batch.open_segments([row for group in rows for row in group], croppable=False)

    def moves(self) -> list[Move]:
        running = [s for s in self.segments if not s.reason]
        return [Sample(running, self.sampling())] if running else []

    def react(self) -> None:
        if all(s.reason for s in self.segments):
            self.results[:] = self.answer([s.row for s in self.segments])

    def answer(self, rows: list[int]) -> list:
        """The Results from the finished rows (one per prompt here)."""
        return self.job.results(self.batch, rows)

    def live_rows(self) -> list[int]:
        return [s.row for s in self.segments]

    def remap(self, new_row: dict[int, int]) -> None:
        for segment in self.segments:
            segment.row = new_row[segment.row]


@dataclass
class SampleConfig(SamplingParams):
    """temperature, top_k (0 = off), top_p (1 = off)."""


@register("sample", SampleConfig, summary="one sampled answer (temperature, top_k, top_p)")
class Sampler(WholeAnswers):
    """One sampled answer per prompt."""
