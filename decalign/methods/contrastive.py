"""Contrastive decoding against a separate, smaller amateur model with the same tokenizer
(O'Brien & Lewis 2023; Li et al., arXiv:2210.15097):

    score = (1 + beta) * s_expert - (beta / tau) * s_amateur     on the expert's plausible set

The amateur runs in its own batch, written in step with the expert's (contrast.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..engine import Engine
from ..errors import DecalignError
from .base import param, register
from .cold import ColdConfig
from .contrast import Branch, Contrast


@dataclass
class ContrastiveConfig(ColdConfig):
    """Contrastive decoding with a separate amateur model (same tokenizer): amateur=PATH, alpha, beta, tau;
    no gate by default (the papers' rule: the gate's evidence is CoLD's, docs/cold.md)."""

    amateur: str = param("", "amateur model (HF id or folder) with the same tokenizer")
    gate: float | None = param(None, "contrast only at steps where the expert's two most likely tokens are within "
                                     "this many nats (none = every step, the papers' rule)")


@functools.lru_cache(maxsize=1)  # kept loaded for the next batch
def _amateur_engine(spec: str) -> Engine:
    return Engine.load(spec)


def load_amateur(spec: str, expert: Engine) -> Engine:
    """The amateur engine, refused unless its tokenizer is the expert's."""
    if not spec:
        raise DecalignError("method contrastive needs an amateur model: --param amateur=PATH")
    amateur = _amateur_engine(spec)
    if amateur.tokenizer.get_vocab() != expert.tokenizer.get_vocab():
        raise DecalignError(f"amateur {spec} has a different tokenizer from the model {expert.name}; "
                            "contrastive decoding needs the same token ids")
    return amateur


@register("contrastive", ContrastiveConfig,
          summary="contrastive decoding against a smaller amateur model with the same tokenizer (amateur=PATH)")
class Contrastive(Contrast):
    """score = (1 + beta) * s_expert - (beta / tau) * s_amateur, the amateur a separate model."""

    def branches(self) -> list[Branch]:
        config = self.config
        amateur = load_amateur(config.amateur, self.job.engine)
        return [Branch(1 + config.beta), Branch(-config.beta / config.amateur_temperature, engine=amateur)]
