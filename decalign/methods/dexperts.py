"""DExperts / proxy-tuning (Liu et al., arXiv:2105.03023):

    score = s_base + beta * (s_expert - s_anti)     on the base's plausible set

expert = the loaded adapter, anti-expert = a second adapter (anti_adapter) or the base itself; all
branches are rows of one batch (contrast.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..engine import BASE
from ..errors import DecalignError, first_line
from .base import param, register
from .contrast import Branch, Contrast, ContrastParams, active_adapter


@dataclass
class DExpertsConfig(ContrastParams):
    """base + beta * (expert - anti-expert); expert = --adapter, anti_adapter = PATH (default: the base)."""

    beta: float = param(1.0, "weight of expert - anti-expert")
    anti_adapter: str = param("", "anti-expert LoRA folder (empty = the base model itself)")


ANTI = "anti_expert"


@register("dexperts", DExpertsConfig, needs_adapter=True,
          summary="DExperts / proxy-tuning: base + beta * (adapter expert - anti-expert), one batch (needs --adapter)")
class DExperts(Contrast):
    """score = s_base + beta * (s_expert - s_anti); the anti-expert is anti_adapter or the base itself."""

    loaded = False

    def branches(self) -> list[Branch]:
        config, model = self.config, self.job.engine.model
        expert = active_adapter(self.job, "dexperts")
        if not config.anti_adapter:  # the anti-expert is the base itself: s_base + beta * (s_expert - s_base)
            return [Branch(1.0 - config.beta, BASE), Branch(config.beta, expert)]
        folder = Path(config.anti_adapter).expanduser()
        if not (folder / "adapter_model.safetensors").is_file():
            raise DecalignError(f"anti_adapter {config.anti_adapter} has no adapter_model.safetensors")
        try:
            model.load_adapter(str(folder), adapter_name=ANTI, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise DecalignError(f"anti_adapter {config.anti_adapter} does not fit the model: "
                                f"{first_line(exc)}") from exc
        self.loaded = True
        return [Branch(1.0, BASE), Branch(config.beta, expert), Branch(-config.beta, ANTI)]

    def close(self) -> None:
        if self.loaded:
            self.job.engine.model.delete_adapter(ANTI)
            self.loaded = False
