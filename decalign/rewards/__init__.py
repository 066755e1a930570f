"""Rewards: text in, scores out. Any scorer plugs into every method through `Reward`.

The names load their modules (torch, transformers) when first used, as the package's own do."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names

_HOMES = {"Reward": ".base", "CallableReward": ".base", "WeightedSum": ".base", "load_reward": ".registry",
          "reward_names": ".registry", "SentimentReward": ".sentiment", "ValueReward": ".value"}

__all__ = ["Reward", "CallableReward", "WeightedSum", "SentimentReward", "ValueReward", "load_reward",
           "reward_names"]

if TYPE_CHECKING:  # what type checkers and editors see
    from .base import CallableReward, Reward, WeightedSum
    from .registry import load_reward, reward_names
    from .sentiment import SentimentReward
    from .value import ValueReward

__getattr__ = lazy_names(__name__, _HOMES)
