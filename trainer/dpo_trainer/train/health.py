"""DPO's own failure modes, judged at each logging step from what TRL logs (pure: logs in,
signals out).

At any step:
- NonFiniteLoss: the loss is NaN or infinite.
- GradientExplosion: the gradient norm is not finite, or over GRAD_NORM_FACTOR times the median
  of the norms logged before it.
Over the last WINDOW logs after warm-up (the first logs say little: the policy starts as the
reference, so every reward is 0):
- AccuracyStuck: the mean reward accuracy is at or below chance (0.5).
- MarginsCollapsed: the mean margin fell under COLLAPSE_FRACTION of the best window mean seen,
  after that best had passed MIN_MARGIN.
- LikelihoodDisplacement: the chosen reward is falling while the margin rises (past
  MIN_MARGIN), and has fallen below zero by more than DISPLACEMENT_SHARE of the margin: the
  policy makes the chosen answers less likely too, only the rejected ones faster.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from dpo_contract.config import HEALTH_ADVICE, DegradedReason, HealthReason, HealthSignal

WINDOW = 4
GRAD_NORM_FACTOR = 10.0
# Norms logged before a spike can be judged against them.
GRAD_NORM_HISTORY = 3
COLLAPSE_FRACTION = 0.25
MIN_MARGIN = 0.05
DISPLACEMENT_SHARE = 0.25
CHANCE = 0.5


@dataclass(frozen=True)
class StepLog:
    """One training log of TRL's DPOTrainer (None where it logged no such value)."""

    step: int
    loss: float | None = None
    accuracy: float | None = None
    margin: float | None = None
    chosen: float | None = None
    grad_norm: float | None = None


class HealthWatch:
    """Feed it each training log; it says which signals hold at that log."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.recent: deque[StepLog] = deque(maxlen=WINDOW)
        self.norms: deque[float] = deque(maxlen=50)
        self.best_margin: float | None = None
        # Each signal as first raised.
        self.raised: dict[DegradedReason, HealthSignal] = {}

    def observe(self, log: StepLog) -> list[HealthSignal]:
        """The signals that hold at `log`, each with what was seen."""
        if log.step >= self.warmup_steps:
            self.recent.append(log)
        found: list[tuple[HealthReason, str]] = []
        if log.loss is not None and not math.isfinite(log.loss):
            found.append(("NonFiniteLoss", f"the loss is {log.loss}"))
        if log.grad_norm is not None:
            spike = self._grad_norm_spike(log.grad_norm)
            if spike:
                found.append(("GradientExplosion", spike))
            if math.isfinite(log.grad_norm):
                self.norms.append(log.grad_norm)
        if self.recent and self.recent[-1] is log and len(self.recent) == WINDOW:
            found.extend(self._window_signals())
        signals = [
            HealthSignal(
                reason=reason,
                step=log.step,
                message=f"{message} at step {log.step}; {HEALTH_ADVICE[reason]}"[:300],
            )
            for reason, message in found
        ]
        for signal in signals:
            self.raised.setdefault(signal.reason, signal)
        return signals

    def _grad_norm_spike(self, norm: float) -> str | None:
        if not math.isfinite(norm):
            return f"the gradient norm is {norm}"
        if len(self.norms) < GRAD_NORM_HISTORY:
            return None
        median = statistics.median(self.norms)
        if median > 0 and norm > GRAD_NORM_FACTOR * median:
            return f"the gradient norm {norm:.3g} is {norm / median:.0f}x its median {median:.3g}"
        return None

    def _window_signals(self) -> list[tuple[HealthReason, str]]:
        logs = list(self.recent)
        span = f"over steps {logs[0].step}-{logs[-1].step}"
        found: list[tuple[HealthReason, str]] = []
        accuracy = _mean(log.accuracy for log in logs)
        if accuracy is not None and accuracy <= CHANCE:
            found.append(("AccuracyStuck", f"reward accuracy {accuracy:.2f} {span}, not above 0.5"))
        margin = _mean(log.margin for log in logs)
        if margin is not None:
            if self.best_margin is None or margin > self.best_margin:
                self.best_margin = margin
            best = self.best_margin
            if best > MIN_MARGIN and margin < COLLAPSE_FRACTION * best:
                found.append(
                    ("MarginsCollapsed", f"reward margin {margin:.3g} {span}, down from {best:.3g}")
                )
        half = WINDOW // 2
        chosen_before = _mean(log.chosen for log in logs[:half])
        chosen_now = _mean(log.chosen for log in logs[half:])
        margin_before = _mean(log.margin for log in logs[:half])
        margin_now = _mean(log.margin for log in logs[half:])
        if (
            chosen_before is not None
            and chosen_now is not None
            and margin_before is not None
            and margin_now is not None
            and margin_now > MIN_MARGIN
            and chosen_now < -DISPLACEMENT_SHARE * margin_now
            and chosen_now < chosen_before
            and margin_now > margin_before
        ):
            found.append(
                (
                    "LikelihoodDisplacement",
                    f"chosen reward fell {chosen_before:.3g} -> {chosen_now:.3g} while the margin "
                    f"rose {margin_before:.3g} -> {margin_now:.3g} {span}",
                )
            )
        return found


def _mean(values: Iterable[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else None
