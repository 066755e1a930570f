"""CoLD, contrastive LoRA decoding (Heisler et al., arXiv:2505.14620):

    expert = model + LoRA, amateur = the same weights without it, both rows in one batched forward
    score = (1 + beta) * s_expert - (beta / tau) * s_amateur     on the expert's plausible set
    token = argmax(score)     (temperature 0; the contrast step is in contrast.py)

beta = 0 or alpha = 1 reduces it exactly to greedy decoding of the expert.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import BASE
from ..errors import DecalignError
from .base import param, register
from .contrast import Branch, Contrast, ContrastParams, active_adapter


@dataclass
class ColdConfig(ContrastParams):
    """CoLD: alpha (mask on the expert), beta, amateur_temperature tau, temperature (0 = greedy), top_p."""

    amateur_temperature: float = param(1.0, "tau: the amateur's logits are divided by it")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.amateur_temperature > 0:
            raise DecalignError(f"amateur_temperature must be > 0, got {self.amateur_temperature}")


@register("cold", ColdConfig, needs_adapter=True,
          summary="CoLD: LoRA expert contrasted with its own base, in one batch (needs --adapter)")
class Cold(Contrast):
    """score = (1 + beta) * s_expert - (beta / tau) * s_base; expert = model + LoRA, base = without it."""

    def branches(self) -> list[Branch]:
        config = self.config
        return [Branch(1 + config.beta, active_adapter(self.job, "cold")),
                Branch(-config.beta / config.amateur_temperature, BASE)]
