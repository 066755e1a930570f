"""CoLD, contrastive LoRA decoding (Heisler et al., arXiv:2505.14620):

    expert = model + LoRA, amateur = the same weights without it, both rows in one batched forward
    score = (1 + beta) * s_expert - (beta / tau) * s_amateur     on the expert's plausible set
    token = argmax(score)     (temperature 0; the contrast step is in contrast.py)

beta = 0 or alpha = 1 reduces it exactly to greedy decoding of the expert. decalign's default also
gates the contrast (gate=0.5): where the expert's top-2 log-probability margin is at least 0.5 nats
its own argmax stands; gate=none gives the paper's rule at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import BASE
from ..errors import DecalignError
from .base import param, register
from .contrast import Branch, Contrast, ContrastParams, active_adapter


@dataclass
class ColdConfig(ContrastParams):
    """CoLD: alpha (mask on the expert), beta, amateur_temperature tau, temperature (0 = greedy), top_p,
    and gate: by default the contrast acts only where the adapter is unsure (docs/cold.md's evidence:
    the ungated rule cost up to 6 points on a task where the gated one stayed within noise); gate=none
    is the paper's rule."""

    amateur_temperature: float = param(1.0, "tau: the amateur's logits are divided by it")
    gate: float | None = param(0.5, "contrast only at steps where the adapter's two most likely tokens are within "
                                    "this many nats (none = every step, the paper's rule; 0 = adapter greedy)")

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
