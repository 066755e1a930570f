"""Greedy decoding: the most likely token at every step."""

from __future__ import annotations

from dataclasses import dataclass

from ..result import Result
from ..sampling import GREEDY
from . import Job, register


@dataclass
class GreedyConfig:
    """Greedy decoding has no parameters."""


@register("greedy", GreedyConfig, summary="the most likely token at every step")
def greedy(job: Job, config: GreedyConfig) -> list[Result]:
    batch = job.start(stream_tokens=True)
    batch.extend(GREEDY)
    return job.results(batch, range(batch.size))
