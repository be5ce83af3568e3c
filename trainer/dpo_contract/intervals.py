"""Normal intervals, the one formula every part uses for them: the gate's Wilson score, a
sweep's paired comparison and the held-out margin at each evaluation during training."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def z_score(confidence: float) -> float:
    """The two-sided standard normal quantile of `confidence` (1.96 at 95%)."""
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


def mean_interval(values: Sequence[float], confidence: float) -> tuple[float, float, float]:
    """The mean of `values` and its normal interval at `confidence` (the standard error of the
    mean; a single value has no spread)."""
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    half = z_score(confidence) * spread / math.sqrt(len(values))
    return mean, mean - half, mean + half
