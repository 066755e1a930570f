"""Rule rewards in the spirit of DeAL's programmatic constraints: no model, exact, instant.

Each scores the response text alone; higher is better.
- length:target=N[:unit=words|chars]  -> -|len - N| / N  (0 at the target)
- keywords:require=a|b[:forbid=c|d]   -> share of required words present - number of forbidden present
- regex:PATTERN                       -> 1 if PATTERN is found, else 0
- json                                -> 1 if the response (code fences stripped) parses as JSON, else 0
"""

from __future__ import annotations

import json
import re

from ..errors import DecalignError
from ..options import parse_options
from .base import Reward


class LengthReward(Reward):
    def __init__(self, target: int, unit: str = "words") -> None:
        super().__init__()
        if target < 1:
            raise DecalignError(f"length reward: target must be >= 1, got {target}")
        if unit not in ("words", "chars"):
            raise DecalignError(f"length reward: unit must be words or chars, got {unit!r}")
        self.target, self.unit = target, unit
        self.name = f"length:target={target}:unit={unit}"

    def _score(self, prompts, responses):
        sizes = [len(r.split()) if self.unit == "words" else len(r) for r in responses]
        return [-abs(size - self.target) / self.target for size in sizes]


class KeywordReward(Reward):
    def __init__(self, require: list[str] = (), forbid: list[str] = ()) -> None:
        super().__init__()
        if not require and not forbid:
            raise DecalignError("keywords reward needs require=word|word and/or forbid=word|word")
        self.require = [w.lower() for w in require]
        self.forbid = [w.lower() for w in forbid]
        self.name = "keywords"

    def _score(self, prompts, responses):
        scores = []
        for text in responses:
            lowered = text.lower()
            present = sum(w in lowered for w in self.require) / len(self.require) if self.require else 0.0
            scores.append(present - sum(w in lowered for w in self.forbid))
        return scores


class RegexReward(Reward):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        try:
            self.pattern = re.compile(pattern)
        except re.error as exc:
            raise DecalignError(f"regex reward: bad pattern {pattern!r}: {exc}") from None
        self.name = f"regex:{pattern}"

    def _score(self, prompts, responses):
        return [1.0 if self.pattern.search(text) else 0.0 for text in responses]


class JsonReward(Reward):
    name = "json"

    def _score(self, prompts, responses):
        scores = []
        for text in responses:
            body = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", text)
            try:
                json.loads(body)
                scores.append(1.0)
            except ValueError:
                scores.append(0.0)
        return scores


def _options(kind: str, text: str, allowed: set[str], example: str) -> dict[str, str]:
    """The options of a rule spec; empty items (a trailing ':') are skipped."""
    return parse_options(filter(None, text.split(":")), what=f"{kind} reward", example=example, allowed=allowed)


def length_reward(text: str) -> Reward:
    options = _options("length", text, {"target", "unit"}, "length:target=100")
    if "target" not in options:
        raise DecalignError("length reward needs a target, e.g. length:target=100")
    try:
        return LengthReward(int(options["target"]), options.get("unit", "words"))
    except ValueError:
        raise DecalignError(f"length reward: target must be an integer, got {options['target']!r}") from None


def keyword_reward(text: str) -> Reward:
    options = _options("keywords", text, {"require", "forbid"}, "keywords:require=a|b")
    split = lambda key: [w for w in options.get(key, "").split("|") if w]  # noqa: E731
    return KeywordReward(split("require"), split("forbid"))
