"""The statistics of the benchmarks, computed by scipy and statsmodels rather than by hand.

eval-task compares decoders on the same items: a Wilson interval per accuracy, McNemar's exact test
and a paired bootstrap interval per comparison. bench reports means over prompts with Student t
intervals.
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence

import numpy as np
from scipy import stats as scipy_stats
from statsmodels.stats.proportion import proportion_confint

from .errors import DecalignError


def wilson(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion: sound near 0 and 1, where the normal one is not."""
    if n == 0:
        return math.nan, math.nan
    low, high = proportion_confint(correct, n, alpha=1 - confidence, method="wilson")
    return max(0.0, float(low)), min(1.0, float(high))  # rounding must not push an end past [0, 1]


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs as b + c fair coin flips."""
    if b + c == 0:
        return 1.0
    return float(scipy_stats.binomtest(b, b + c, 0.5).pvalue)


def paired_bootstrap(reference: Sequence[bool], other: Sequence[bool], resamples: int = 10000,
                     seed: int = 0) -> tuple[float, float, float]:
    """(difference, low, high): accuracy of `other` minus `reference` on the same items, with the
    95% percentile interval of that difference over items resampled with replacement (one seeded
    numpy Generator: the same inputs and seed give the same interval)."""
    if len(reference) != len(other) or not reference:
        raise DecalignError("a paired bootstrap needs two equally long, non-empty lists of outcomes")
    diff = np.asarray(other, dtype=float) - np.asarray(reference, dtype=float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def t_critical(df: int) -> float:
    """Two-sided 95% Student t critical value for `df` degrees of freedom.

    Three decimals, as printed t tables give it, and the normal 1.96 beyond 30 degrees of freedom:
    the values bench has always used, so its intervals stay comparable with earlier runs.
    """
    return round(float(scipy_stats.t.ppf(0.975, df)), 3) if df <= 30 else 1.96


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t)."""
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, t_critical(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
