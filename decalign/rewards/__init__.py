"""Rewards: text in, scores out. Any scorer plugs into every method through `Reward`."""

from .base import CallableReward, Reward, load_reward, reward_names
from .sentiment import SentimentReward

__all__ = ["Reward", "CallableReward", "SentimentReward", "load_reward", "reward_names"]
