"""Rewards: text in, scores out. Any scorer plugs into every method through `Reward`."""

from .base import CallableReward, Reward, WeightedSum
from .registry import load_reward, reward_names
from .sentiment import SentimentReward
from .value import ValueReward

__all__ = ["Reward", "CallableReward", "WeightedSum", "SentimentReward", "ValueReward", "load_reward",
           "reward_names"]
