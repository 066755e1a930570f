"""Ancestral sampling with temperature, top-k and top-p."""

from __future__ import annotations

from dataclasses import dataclass

from ..result import Result
from . import Job, SamplingParams, register


@dataclass
class SampleConfig(SamplingParams):
    """temperature, top_k (0 = off), top_p (1 = off)."""


@register("sample", SampleConfig, summary="one sampled answer (temperature, top_k, top_p)")
def sample(job: Job, config: SampleConfig) -> list[Result]:
    batch = job.start(stream_tokens=True)
    batch.extend(config.sampling)
    return job.results(batch, range(batch.size))
