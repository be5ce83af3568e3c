"""How sure the gate is: intervals for its estimates and a verdict that knows its sample size.

Pure functions over per-pair numbers (numpy only), so the fast test tier checks them directly.

- Reward accuracy, a share of pairs: the Wilson score interval (good at small n and near 0 or
  1, where the normal approximation is not).
- A mean (the reward margin) or a ratio of sums (the anchor NLL increase): a percentile
  bootstrap over pairs (or anchor texts), seeded, so one adapter always gets one verdict.
- Challenger against champion on the same pairs: a paired bootstrap of the per-pair deltas
  (pairs are resampled together, so what both get right or wrong cancels out).

A criterion passes when its interval clears the threshold, fails when its estimate does not,
and is inconclusive in between: the estimate passes but the sample is too small to be sure.
For those, the number of pairs that would decide it is estimated from how an interval narrows
(as 1/sqrt(n)): n x (half-width / distance of the estimate from the threshold)^2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from dpo_contract.intervals import z_score
from numpy.typing import NDArray

Relation = Literal[">=", "<=", ">"]
Outcome = Literal["pass", "fail", "inconclusive"]
Method = Literal["wilson", "bootstrap", "paired-bootstrap"]

RESAMPLES = 2000
SEED = 0
# Rows of resampled indices built at once: bounds the memory of a bootstrap of many pairs.
_CHUNK = 100


@dataclass(frozen=True)
class Estimate:
    """A measured value with its interval at `confidence`, over `n` samples."""

    value: float
    low: float
    high: float
    n: int
    method: Method
    confidence: float


def wilson(successes: int, n: int, confidence: float) -> Estimate:
    """The share successes/n with its Wilson score interval."""
    if n == 0:
        return Estimate(math.nan, 0.0, 1.0, 0, "wilson", confidence)
    z, p = z_score(confidence), successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n, "wilson", confidence)


def bootstrap(
    samples: tuple[NDArray[np.float64], ...],
    statistic: Callable[..., NDArray[np.float64]],
    confidence: float,
    *,
    method: Method = "bootstrap",
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Estimate:
    """`statistic` of the samples (arrays of equal length, resampled together, row-wise: it
    takes arrays of shape (resamples, n) and reduces the last axis) with its percentile
    interval."""
    n = len(samples[0])
    value = float(statistic(*(s[np.newaxis, :] for s in samples))[0])
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, method, confidence)
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, resamples, _CHUNK):
        rows = min(_CHUNK, resamples - start)
        picked = rng.integers(0, n, size=(rows, n))
        draws.append(statistic(*(s[picked] for s in samples)))
    values = np.concatenate(draws)
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return Estimate(value, float(low), float(high), n, method, confidence)


def mean(values: NDArray[np.float64]) -> NDArray[np.float64]:
    return values.mean(axis=-1)  # type: ignore[no-any-return]


def judge(estimate: Estimate, relation: Relation, threshold: float) -> tuple[Outcome, int | None]:
    """Pass when the interval clears the threshold, fail when the estimate does not; otherwise
    inconclusive, with the number of samples that would likely decide it."""

    def holds(x: float) -> bool:
        return {">=": x >= threshold, "<=": x <= threshold, ">": x > threshold}[relation]

    bound = estimate.high if relation == "<=" else estimate.low
    if holds(bound):
        return "pass", None
    if not holds(estimate.value):
        return "fail", None
    gap = abs(estimate.value - threshold)
    half = abs(estimate.value - bound)
    if gap == 0:
        return "fail", None  # an estimate exactly at its threshold: no sample size clears it
    return "inconclusive", max(estimate.n + 1, math.ceil(estimate.n * (half / gap) ** 2))
