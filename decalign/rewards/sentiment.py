"""VADER sentiment as a reward: rule-based, instant, in [-1, 1] (PyPI nltk-vader-sentiment)."""

from __future__ import annotations

from vader import SentimentIntensityAnalyzer

from .base import Reward


class SentimentReward(Reward):
    """Compound VADER polarity of the response; the prompt is ignored. Empty text scores 0."""

    name = "sentiment"

    def __init__(self) -> None:
        super().__init__()
        self.analyzer = SentimentIntensityAnalyzer()

    def _score(self, prompts, responses):
        return [self.analyzer.polarity_scores(text)["compound"] for text in responses]
