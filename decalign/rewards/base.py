"""The reward interface and the registry that turns a spec string into a reward."""

from __future__ import annotations

import importlib
import math
import re
import time
from typing import Callable, Sequence

from ..errors import DecalignError

Prompt = str | list[dict]


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

    def _checked(self, scorer: Callable, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise DecalignError(f"reward {self.name}: {len(prompts)} prompts but {len(responses)} responses")
        if not responses:
            return []
        start = time.perf_counter()
        try:
            scores = [float(s) for s in scorer(prompts, responses)]
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


def _python_reward(target: str) -> Reward:
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise DecalignError(f"python reward needs python:module:function, got python:{target}")
    try:
        fn = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise DecalignError(f"cannot import reward python:{target}: {exc}") from exc
    return fn if isinstance(fn, Reward) else CallableReward(fn, name=f"python:{target}")


def _sentiment(_: str) -> Reward:
    from .sentiment import SentimentReward

    return SentimentReward()


def _rule(kind: str) -> Callable[[str], Reward]:
    def make(options: str) -> Reward:
        from . import rules

        if kind == "regex":
            return rules.RegexReward(options)
        return {"length": rules.length_reward, "keywords": rules.keyword_reward}[kind](options)

    return make


def _json(_: str) -> Reward:
    from .rules import JsonReward

    return JsonReward()


def _hf(kind: str) -> Callable[[str], Reward]:
    def make(options: str) -> Reward:
        from . import hf

        return hf.classifier_reward(options) if kind == "hf" else hf.judge_reward(options)

    return make


def _value(spec: str) -> Reward:
    """value:NAME or value:PATH: a prefix value run as a reward on the policy it was trained for."""
    from ..values import ValueReward

    return ValueReward(spec)


def _harmless(path: str) -> Reward:
    """harmless: the shipped head; harmless:PATH: a head trained with `decalign train-reward`."""
    from .harmless import HarmlessReward

    return HarmlessReward(path=path or None)


_BUILTIN: dict[str, Callable[[str], Reward]] = {"sentiment": _sentiment, "vader": _sentiment, "json": _json,
                                                "judge": _hf("judge"), "harmless": _harmless}
_PREFIXED: dict[str, Callable[[str], Reward]] = {
    "python": _python_reward, "hf": _hf("hf"), "judge": _hf("judge"), "harmless": _harmless,
    "length": _rule("length"), "keywords": _rule("keywords"), "regex": _rule("regex"), "value": _value,
}


def reward_names() -> list[str]:
    return sorted(_BUILTIN) + [f"{prefix}:..." for prefix in sorted(_PREFIXED)]


def load_reward(spec: "str | Reward | Callable | None") -> Reward | None:
    """A reward from a spec: a name ('sentiment'), 'python:module:function', a Reward, or a callable."""
    if spec is None or isinstance(spec, Reward):
        return spec
    if callable(spec):
        return CallableReward(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise DecalignError(f"reward must be a name or a callable, got {spec!r}")
    terms = _weighted_terms(spec.strip())
    if terms is None:
        return _single_reward(spec.strip())
    return WeightedSum([(weight, _single_reward(name)) for weight, name in terms])


_WEIGHTED = re.compile(r"^(?:([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)\s*\*\s*)?(.+)$")


def _known(name: str) -> bool:
    return name in _BUILTIN or name.partition(":")[0] in _PREFIXED


def _weighted_terms(spec: str) -> list[tuple[float, str]] | None:
    """'harmless + 0.5*sentiment' -> [(1.0, 'harmless'), (0.5, 'sentiment')]; None for a single reward.
    A '+' or '*' inside one reward's options (regex:a+b) is left alone."""
    pieces = [piece.strip() for piece in spec.split("+")]
    parsed = []
    for piece in pieces:
        match = _WEIGHTED.match(piece)
        if not piece or match is None or not _known(match.group(2).strip()):
            return None
        parsed.append((float(match.group(1)) if match.group(1) else 1.0, match.group(2).strip()))
    return parsed if len(parsed) > 1 or parsed[0][0] != 1.0 else None


def _single_reward(spec: str) -> Reward:
    if spec in _BUILTIN:
        return _BUILTIN[spec]("")
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in _PREFIXED:
        return _PREFIXED[prefix](rest)
    raise DecalignError(f"unknown reward {spec!r}; choose from: {', '.join(reward_names())}")
