"""Reward specs: the table that turns a spec string ('sentiment', 'hf:MODEL:label=1',
'harmless + 0.5*sentiment', 'python:module:function') into a Reward."""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path
from typing import Callable

from ..errors import DecalignError
from .base import CallableReward, Reward, WeightedSum
from .cross_encoder import CrossEncoderReward
from .harmless import WEIGHTS_DIR, HarmlessReward
from .hf import classifier_reward, judge_reward
from .rules import JsonReward, RegexReward, keyword_reward, length_reward
from .sentiment import SentimentReward
from .value import ValueReward


def _python_reward(target: str) -> Reward:
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise DecalignError(f"python reward needs python:module:function, got python:{target}")
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:  # the `decalign` command's path lacks the current folder
        sys.path.append(here)  # after installed packages, so that a local file shadows none of them
    try:
        fn = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise DecalignError(f"cannot import reward python:{target}: {exc}") from exc
    return fn if isinstance(fn, Reward) else CallableReward(fn, name=f"python:{target}")


def _sentiment(_: str) -> Reward:
    return SentimentReward()


def _json(_: str) -> Reward:
    return JsonReward()


def _harmless(path: str) -> Reward:
    """harmless: the shipped reward; harmless:PATH: one trained with `decalign train-reward`, either a
    fine-tuned cross-encoder (a folder with reward.json) or a probe head (head.safetensors)."""
    folder = Path(path) if path else WEIGHTS_DIR
    if (folder / "reward.json").is_file():
        return CrossEncoderReward(folder, name="harmless" if not path else f"harmless:{path}")
    reward = HarmlessReward(path=path or None)
    if path:
        reward.name = f"harmless:{path}"  # scores say which head made them
    return reward


_BUILTIN: dict[str, Callable[[str], Reward]] = {"sentiment": _sentiment, "vader": _sentiment, "json": _json,
                                                "judge": judge_reward, "harmless": _harmless}
_PREFIXED: dict[str, Callable[[str], Reward]] = {
    "python": _python_reward, "hf": classifier_reward, "judge": judge_reward, "harmless": _harmless,
    "length": length_reward, "keywords": keyword_reward, "regex": RegexReward, "value": ValueReward,
}


def reward_names() -> list[str]:
    """The spec forms `load_reward` knows, as its unknown-reward error lists them."""
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
