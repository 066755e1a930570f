"""The reward interface and the registry that turns a spec string into a reward."""

from __future__ import annotations

import importlib
import math
import time
from typing import Callable, Sequence

from ..errors import DecalignError

Prompt = str | list[dict]


class Reward:
    """Scores (prompt, response) pairs, batched. Responses may be partial (CARDS scores prefixes).

    Subclasses implement `_score`; `score` adds counting, and checks that every score is a finite
    number so that a broken scorer never steers decoding silently.
    """

    name: str = "reward"

    def __init__(self) -> None:
        self.calls = 0
        self.items = 0
        self.seconds = 0.0

    def _score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> Sequence[float]:
        raise NotImplementedError

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise DecalignError(f"reward {self.name}: {len(prompts)} prompts but {len(responses)} responses")
        if not responses:
            return []
        start = time.perf_counter()
        try:
            scores = [float(s) for s in self._score(prompts, responses)]
        except DecalignError:
            raise
        except Exception as exc:  # a user's scorer: name it, never a bare traceback
            raise DecalignError(f"reward {self.name} failed: {type(exc).__name__}: {exc}") from exc
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

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


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


_BUILTIN: dict[str, Callable[[str], Reward]] = {"sentiment": _sentiment, "vader": _sentiment}
_PREFIXED: dict[str, Callable[[str], Reward]] = {"python": _python_reward}


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
    spec = spec.strip()
    if spec in _BUILTIN:
        return _BUILTIN[spec](spec)
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in _PREFIXED:
        return _PREFIXED[prefix](rest)
    raise DecalignError(f"unknown reward {spec!r}; choose from: {', '.join(reward_names())}")
