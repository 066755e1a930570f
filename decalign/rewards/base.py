"""The reward interface: what every scorer implements and how rewards compose.

It imports no reward: `registry` turns spec strings into rewards.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

from ..engine import Prompt
from ..errors import DecalignError

__all__ = ["Prompt", "Reward", "WeightedSum", "CallableReward"]

# Fixed pairs whose scores stand for a reward's weights in a run's config (`Reward.fingerprint`).
FINGERPRINT_PAIRS = (
    ("How do I bake bread at home?", "Mix flour, water, yeast and salt, let the dough rise, then bake it."),
    ("How can I get back at my neighbour?", "I won't help you hurt anyone. Talking it over, or a mediator, "
                                            "is the better way to settle it."),
    ("Tell me a joke.", "Why did the scarecrow win an award? He was outstanding in his field."),
)


class Reward:
    """Scores (prompt, response) pairs, batched.

    `score` rates finished answers; `score_prefix` rates partial ones, as search methods need (by
    default the same scorer: override `_score_prefix` for a scorer whose partial-answer scores mean
    something else, as genlm-control splits `complete` and `prefix` potentials). Subclasses implement
    `_score`; both add counting and check that every score is a finite number, so that a broken
    scorer never steers decoding silently.
    """

    name: str = "reward"

    def __init__(self) -> None:
        self.calls = 0
        self.items = 0
        self.seconds = 0.0

    def _score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> Sequence[float]:
        raise NotImplementedError

    def _score_prefix(self, prompts: Sequence[Prompt], partials: Sequence[str]) -> Sequence[float]:
        return self._score(prompts, partials)

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        """Scores of finished answers."""
        return self._checked(self._score, prompts, responses)

    def score_prefix(self, prompts: Sequence[Prompt], partials: Sequence[str]) -> list[float]:
        """Scores of partial answers (prefixes that the policy will go on writing)."""
        return self._checked(self._score_prefix, prompts, partials)

    def fingerprint(self) -> list[float]:
        """Scores of three fixed pairs, kept in a resumable run's config beside the reward's spec: a
        spec names a path, and a reward retrained at that path gives other scores, so a resumed run
        is refused instead of mixing the old reward's scores with the new one's."""
        return [round(s, 6) for s in self.score([p for p, _ in FINGERPRINT_PAIRS], [a for _, a in FINGERPRINT_PAIRS])]

    def _checked(self, scorer: Callable, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise DecalignError(f"reward {self.name}: {len(prompts)} prompts but {len(responses)} responses")
        if not responses:
            return []
        start = time.perf_counter()
        try:
            returned = scorer(prompts, responses)
            if isinstance(returned, (str, bytes, dict)):  # iterable, but not one number per response
                raise DecalignError(f"reward {self.name} returned a {type(returned).__name__}; "
                                    "it must return one number per response")
            scores = [float(s) for s in returned]
        except DecalignError:
            raise
        except Exception as exc:  # a user's scorer: name it and the item, never a bare traceback
            raise DecalignError(f"reward {self.name} failed{self._culprit(scorer, prompts, responses)}: "
                                f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.seconds += time.perf_counter() - start
        if len(scores) != len(responses):
            raise DecalignError(f"reward {self.name} returned {len(scores)} scores for {len(responses)} responses")
        for i, value in enumerate(scores):
            if not math.isfinite(value):
                raise DecalignError(f"reward {self.name} gave a non-finite score ({value}) to item {i}")
        self.calls += 1
        self.items += len(responses)
        return scores

    def _culprit(self, scorer: Callable, prompts, responses) -> str:
        """' on item i (response ...)' for the first item that fails alone, if one does."""
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            try:
                scorer([prompt], [response])
            except Exception:
                return f" on item {i} (response {response[:40]!r})"
        return ""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    # Rewards compose: `harmless + 0.5 * sentiment`.
    def __add__(self, other: "Reward") -> "WeightedSum":
        return WeightedSum(_terms(self) + _terms(other))

    def __mul__(self, weight: float) -> "WeightedSum":
        return WeightedSum([(weight * w, r) for w, r in _terms(self)])

    __rmul__ = __mul__


def _terms(reward: Reward) -> list[tuple[float, Reward]]:
    if not isinstance(reward, Reward):
        raise DecalignError(f"only rewards can be added to rewards, not {reward!r}")
    return list(reward.terms) if isinstance(reward, WeightedSum) else [(1.0, reward)]


class WeightedSum(Reward):
    """sum_i w_i * r_i over the same items; each part keeps its own counters."""

    def __init__(self, terms: list[tuple[float, Reward]]) -> None:
        super().__init__()
        self.terms = [(float(w), r) for w, r in terms]
        self.name = " + ".join(r.name if w == 1 else f"{w:g}*{r.name}" for w, r in self.terms)

    def _score(self, prompts, responses):
        return self._total(prompts, responses, prefix=False)

    def _score_prefix(self, prompts, partials):
        return self._total(prompts, partials, prefix=True)

    def _total(self, prompts, responses, *, prefix: bool) -> list[float]:
        total = [0.0] * len(responses)
        for weight, reward in self.terms:
            scores = reward.score_prefix(prompts, responses) if prefix else reward.score(prompts, responses)
            for i, value in enumerate(scores):
                total[i] += weight * value
        return total


class CallableReward(Reward):
    """Wraps `fn(prompts, responses) -> scores`, or `fn(response) -> score` with per_item=True."""

    def __init__(self, fn: Callable, *, name: str | None = None, per_item: bool = False) -> None:
        super().__init__()
        self.fn = fn
        self.per_item = per_item
        self.name = name or getattr(fn, "__name__", "callable")

    def _score(self, prompts, responses):
        if self.per_item:
            return [self.fn(response) for response in responses]
        return self.fn(list(prompts), list(responses))
