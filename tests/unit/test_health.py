"""DPO's health signals (dpo_trainer.train.health) on the series that raise them, and on a
healthy one that must raise nothing."""

from __future__ import annotations

import math

from dpo_contract.reports import TrainingSummary
from dpo_contract.termination import parse_termination_message
from dpo_trainer.train.health import WINDOW, HealthWatch, StepLog

from tests.reports import STOPPED_EARLY, TRAINED, TRAINED_DEGRADED


def reasons(watch: HealthWatch, logs: list[StepLog]) -> list[set[str]]:
    return [{signal.reason for signal in watch.observe(log)} for log in logs]


def healthy(steps: int) -> list[StepLog]:
    """Accuracy climbing from 0.55, margins and chosen rewards growing: a run going well."""
    return [
        StepLog(
            step=step,
            loss=0.69 - 0.01 * step,
            accuracy=min(0.55 + 0.02 * step, 0.95),
            margin=0.02 * step,
            chosen=0.01 * step,
            grad_norm=1.0 + 0.1 * (step % 3),
        )
        for step in range(1, steps + 1)
    ]


def test_a_healthy_run_raises_nothing() -> None:
    watch = HealthWatch(warmup_steps=2)
    assert all(not found for found in reasons(watch, healthy(40)))
    assert watch.raised == {}


def test_a_nan_loss_is_raised_at_once_even_in_warm_up() -> None:
    watch = HealthWatch(warmup_steps=100)
    found = reasons(watch, [*healthy(2), StepLog(step=3, loss=math.nan, grad_norm=math.nan)])
    assert found[-1] == {"NonFiniteLoss", "GradientExplosion"}
    assert watch.raised["NonFiniteLoss"].step == 3
    assert "learningRate" in watch.raised["NonFiniteLoss"].message


def test_a_gradient_norm_ten_times_its_median_is_an_explosion() -> None:
    watch = HealthWatch(warmup_steps=100)
    logs = healthy(5)
    spike = StepLog(step=6, loss=0.6, grad_norm=40.0)
    found = reasons(watch, [*logs, spike])
    assert found[-1] == {"GradientExplosion"}
    assert "x its median" in watch.raised["GradientExplosion"].message
    # Twice the median is noise, not an explosion.
    calm = HealthWatch(warmup_steps=100)
    assert reasons(calm, [*logs, StepLog(step=6, loss=0.6, grad_norm=2.4)])[-1] == set()


def test_accuracy_at_chance_after_warm_up_is_stuck_but_not_during_it() -> None:
    stuck = [
        StepLog(step=step, loss=0.693, accuracy=0.5 if step % 2 else 0.375, margin=0.0)
        for step in range(1, 15)
    ]
    watch = HealthWatch(warmup_steps=8)
    found = reasons(watch, stuck)
    # Judged over the first WINDOW logs from step 8 on: steps 8 to 11.
    assert all("AccuracyStuck" not in f for f in found[:10]), "not judged in warm-up"
    assert all("AccuracyStuck" in f for f in found[10:])
    assert watch.raised["AccuracyStuck"].step == 7 + WINDOW
    assert "0.44" in watch.raised["AccuracyStuck"].message


def test_margins_that_grew_and_fell_back_have_collapsed() -> None:
    logs = healthy(10)
    fallen = [
        StepLog(step=step, loss=0.6, accuracy=0.7, margin=0.01, chosen=0.05)
        for step in range(11, 11 + WINDOW)
    ]
    watch = HealthWatch(warmup_steps=2)
    found = reasons(watch, [*logs, *fallen])
    assert "MarginsCollapsed" in found[-1]
    assert not any("MarginsCollapsed" in f for f in found[:10])


def test_chosen_rewards_falling_while_margins_rise_is_likelihood_displacement() -> None:
    # Both log-probabilities fall, the rejected one faster: margins look fine, chosen answers
    # get less likely.
    displaced = [
        StepLog(step=step, loss=0.6, accuracy=0.8, margin=0.1 * step, chosen=-0.05 * step)
        for step in range(1, 9)
    ]
    watch = HealthWatch(warmup_steps=2)
    found = reasons(watch, displaced)
    assert "LikelihoodDisplacement" in found[-1]
    assert "chosen reward fell" in watch.raised["LikelihoodDisplacement"].message
    # Chosen rewards that fall but stay above the reference are not displacement.
    watch = HealthWatch(warmup_steps=2)
    above = [
        StepLog(step=s, loss=0.6, accuracy=0.8, margin=0.1 * s, chosen=1.0 - 0.05 * s)
        for s in range(1, 9)
    ]
    assert not any("LikelihoodDisplacement" in f for f in reasons(watch, above))


def test_a_training_summary_with_health_survives_the_termination_message() -> None:
    # The trainer writes it without nulls (an unsharded run has no mesh); the operator must
    # still read every field back.
    for text in (TRAINED, TRAINED_DEGRADED, STOPPED_EARLY):
        summary = parse_termination_message(text)
        assert isinstance(summary, TrainingSummary), text
    stopped = parse_termination_message(STOPPED_EARLY)
    assert isinstance(stopped, TrainingSummary)
    assert stopped.stopped_early is not None
    assert stopped.stopped_early.kept_step == 20
    assert [signal.reason for signal in stopped.health] == ["NonFiniteLoss"]
