"""`value:NAME` / `value:PATH`: a prefix value (decalign.values) run as an ordinary reward."""

from __future__ import annotations

from typing import Sequence

from ..engine import Engine, get_engine
from ..values import load_value, teacher_forced_features
from .base import Prompt, Reward


class ValueReward(Reward):
    """A value as an ordinary reward, `value:NAME` or `value:PATH`: it runs the policy it was trained for
    over each (prompt, partial answer) and reads the value off its states (one forward pass per item)."""

    def __init__(self, spec: str, engine: Engine | None = None) -> None:
        super().__init__()
        self.value = load_value(spec or "harmless")
        self.name = f"value:{self.value.name}"
        if engine is not None:
            self.value.check_engine(engine)
        self._engine = engine

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            policy = self.value.card.get("policy", {})
            self._engine = get_engine(None if policy.get("model") == "smollm2" else policy.get("model"),
                                      policy.get("adapter"))
            self.value.check_engine(self._engine)
        return self._engine

    def _score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        engine = self.engine
        scores = []
        for prompt, response in zip(prompts, responses):
            answer = engine.tokenizer(response, add_special_tokens=False)["input_ids"] if response else []
            features = teacher_forced_features(engine, engine.render(prompt), [answer],
                                               self.value.layers, [[len(answer)]])
            scores.append(float(self.value.score_features(features)[0]))
        return scores
