"""A DPOSweep's winner among the trials whose gate passed: a paired comparison on the held-out
pairs every gate scored (eval.json `pairMargins`). The local sweep decides it in process; on a
cluster the sweep's chooser pod does (`dpo-trainer choose`) and says it in its termination
message (`SweepChoice`).
"""

from __future__ import annotations

import statistics
from typing import Literal

from pydantic import Field

from dpo_contract.fields import ContractModel
from dpo_contract.intervals import mean_interval


class TrialComparison(ContractModel):
    """One trial against the winner on the same held-out pairs: its mean margin per unit of
    beta and, for every trial but the winner, the winner's margin minus this trial's, pair by
    pair: the mean and its interval."""

    number: int
    mean: float
    difference: float | None = None
    low: float | None = None
    high: float | None = None

    @property
    def tied(self) -> bool:
        """The interval reaches zero: the pairs cannot tell this trial from the winner."""
        return self.low is not None and self.low <= 0.0

    def describe(self) -> str:
        """`trial 2: +0.31 [+0.12, +0.5]  worse` (the winner's margin per beta minus this
        trial's); the winner itself: `trial 3: the winner`."""
        if self.difference is None or self.low is None or self.high is None:
            return f"trial {self.number}: the winner"
        said = "tied within the interval" if self.tied else "worse"
        return (
            f"trial {self.number}: {self.difference:+.3g} [{self.low:+.3g}, {self.high:+.3g}]  "
            f"{said}"
        )


class SweepChoice(ContractModel):
    """The chooser's termination message."""

    status: Literal["chosen"] = "chosen"
    winner: int
    confidence: float
    compared: list[TrialComparison] = Field(max_length=64)

    @property
    def tied(self) -> list[int]:
        return [c.number for c in self.compared if c.tied]


def choose_winner(margins: dict[int, list[float]], confidence: float) -> SweepChoice:
    """The winner from each passed trial's held-out margin per pair per unit of beta (the
    reward margin is beta times the log-probability ratio margin, so a larger beta alone would
    look better): the highest mean (the earlier trial on an exact tie), compared pair against
    pair with every other trial at `confidence`. A trial whose interval reaches zero is tied;
    the rule for a tie is that the higher mean still wins."""
    sizes = {len(values) for values in margins.values()}
    if not margins or len(sizes) != 1 or 0 in sizes:
        raise ValueError(
            f"the trials' gates scored different numbers of pairs ({sorted(sizes)}); a paired "
            "comparison needs the same held-out pairs for every trial"
        )
    means = {number: statistics.fmean(values) for number, values in margins.items()}
    winner = max(means, key=lambda number: (means[number], -number))
    compared = []
    for number in sorted(margins):
        if number == winner:
            compared.append(TrialComparison(number=number, mean=_readable(means[number])))
            continue
        differences = [a - b for a, b in zip(margins[winner], margins[number], strict=True)]
        mean, low, high = mean_interval(differences, confidence)
        compared.append(
            TrialComparison(
                number=number,
                mean=_readable(means[number]),
                difference=_readable(mean),
                low=_readable(low),
                high=_readable(high),
            )
        )
    return SweepChoice(winner=winner, confidence=confidence, compared=compared)


def _readable(value: float) -> float:
    """Four significant digits (the sign kept): what a person reads, and 64 trials' comparisons
    fit in a termination message."""
    return float(f"{value:.4g}")
