"""The DPOSweep lifecycle (`decide_sweep`): trials paced by maxParallel, the table and best so
far in status, the winner chosen by the chooser pod (or alone), approved, and the end."""

from __future__ import annotations

import copy
from typing import Any

from dpo_contract.sweep import SweepChoice, TrialComparison, choose_winner
from dpo_contract.termination import TERMINATION_MESSAGE_LIMIT, termination_message_json
from dpo_operator.api.sweep import DPOSweep, Rung
from dpo_operator.core.lifecycle.sweep import (
    ApproveTrial,
    CreateChooser,
    CreateTrial,
    SeenChooser,
    SeenTrial,
    StopTrial,
    SweepDecision,
    SweepObserved,
    decide_sweep,
)
from dpo_operator.core.sweep import trials

from tests.unit.test_sweep import EXAMPLE

BETAS = {1: 0.05, 2: 0.05, 3: 0.1, 4: 0.1, 5: 0.3, 6: 0.3}


def sweep_manifest(**spec: Any) -> dict[str, Any]:
    manifest = copy.deepcopy(EXAMPLE)
    manifest["metadata"].update(namespace="team", uid="sweep-uid")
    manifest["spec"].update(spec)
    return manifest


def seen(
    number: int,
    phase: str | None,
    verdict: str | None = None,
    margin: float | None = None,
    approved: bool = False,
) -> SeenTrial:
    return SeenTrial(
        number,
        f"beta-sweep-{number}",
        phase,
        margin,
        None,
        verdict,  # type: ignore[arg-type]
        approved,
        adapter_digest=f"sha256:{number}" if verdict == "Passed" else None,
    )


def gated(number: int, margin: float = 0.1) -> SeenTrial:
    return seen(number, "AwaitingApproval", "Passed", margin)


def step(
    manifest: dict[str, Any],
    observed: SweepObserved,
    before: SweepDecision | None = None,
) -> SweepDecision:
    if before is not None:
        manifest = {**manifest, "status": before.status.model_dump(by_alias=True, mode="json")}
    return decide_sweep(DPOSweep.model_validate(manifest), trials(manifest), observed)


def test_trials_start_in_order_never_more_than_max_parallel_unfinished() -> None:
    manifest = sweep_manifest()
    first = step(manifest, SweepObserved({}))
    assert first.actions == [CreateTrial(1), CreateTrial(2)]
    assert (first.status.phase, first.status.total, first.status.running) == ("Running", 6, 2)
    assert [e.reason for e in first.events] == ["TrialCreated", "TrialCreated"]
    assert first.status.trials[0].settings == "dpo.beta=0.05, dpo.learningRate=0.0001"

    # Nothing has finished: nothing more starts, however often it is asked.
    training = SweepObserved({1: seen(1, "Training"), 2: seen(2, "Queued")})
    assert step(manifest, training, first).actions == []

    # Trial 1's gate passed (it waits for the sweep), trial 2 failed: two more start.
    ended = SweepObserved({1: gated(1, 0.02), 2: seen(2, "Failed")})
    later = step(manifest, ended, first)
    assert later.actions == [CreateTrial(3), CreateTrial(4)]
    assert (later.status.done, later.status.running) == (2, 2)
    assert sorted(e.reason for e in later.events) == ["TrialCreated"] * 2 + ["TrialFinished"] * 2
    assert later.status.best == "1: 0.4/beta"
    assert later.status.message == "2 of 6 trials finished"


def test_the_best_so_far_is_per_unit_of_beta_among_gated_trials() -> None:
    observed = SweepObserved(
        {1: gated(1, 0.05), 3: gated(3, 0.08), 5: seen(5, "Rejected", "Rejected", 0.9)}
    )
    # 0.05/0.05 = 1.0 beats 0.08/0.1 = 0.8; a rejected trial is never the best.
    assert step(sweep_manifest(), observed).status.best == "1: 1/beta"


def all_gated(margins: dict[int, float]) -> dict[int, SeenTrial]:
    return {
        n: gated(n, margins[n]) if n in margins else seen(n, "Rejected", "Rejected") for n in BETAS
    }


def test_two_gated_trials_go_to_the_chooser_and_only_its_winner_is_approved() -> None:
    manifest = sweep_manifest()
    trials_seen = all_gated({3: 0.2, 5: 0.3})
    choosing = step(manifest, SweepObserved(trials_seen))
    assert choosing.actions == [CreateChooser((3, 5))]
    assert choosing.status.phase == "Choosing"

    running = SweepObserved(trials_seen, SeenChooser("Running"))
    assert step(manifest, running, choosing).actions == [], "one chooser"

    margins = {3: [0.3 + 0.01 * (i % 5) for i in range(40)], 5: [0.3] * 40}
    choice = choose_winner({n: [m / BETAS[n] for m in ms] for n, ms in margins.items()}, 0.95)
    assert choice.winner == 3, "0.3/0.1 per beta beats 0.3/0.3"
    message = termination_message_json(choice)
    chosen = step(manifest, SweepObserved(trials_seen, SeenChooser("Complete", message)), choosing)
    assert chosen.actions == [ApproveTrial("beta-sweep-3", "sha256:3")]
    assert (chosen.status.phase, chosen.status.winner) == ("Promoting", 3)
    assert [c.number for c in chosen.status.comparisons] == [3, 5]
    assert "WinnerChosen" in [e.reason for e in chosen.events]

    # Approved, it promotes (no second approval), then ends the sweep.
    trials_seen[3] = seen(3, "Promoting", "Passed", 0.2, approved=True)
    promoting = step(manifest, SweepObserved(trials_seen), chosen)
    assert promoting.actions == []
    assert promoting.status.phase == "Promoting"
    assert promoting.status.done == 6, "the approved trial stays finished"
    trials_seen[3] = seen(3, "Succeeded", "Passed", 0.2, approved=True)
    done = step(manifest, SweepObserved(trials_seen), promoting)
    assert done.status.phase == "Succeeded"
    assert "Succeeded" in [e.reason for e in done.events]


def test_a_tie_is_said_and_the_higher_mean_wins() -> None:
    tie = SweepChoice(
        winner=5,
        confidence=0.95,
        compared=[
            TrialComparison(number=3, mean=1.0, difference=0.01, low=-0.02, high=0.04),
            TrialComparison(number=5, mean=1.01),
        ],
    )
    observed = SweepObserved(
        all_gated({3: 0.1, 5: 0.3}), SeenChooser("Complete", termination_message_json(tie))
    )
    decided = step(sweep_manifest(), observed)
    (said,) = [e.message for e in decided.events if e.reason == "WinnerChosen"]
    assert "tied within the interval with trial(s) 3: the higher mean wins" in said
    assert decided.status.comparisons[0].tied


def test_one_gated_trial_wins_alone_and_none_fails_the_sweep() -> None:
    alone = step(sweep_manifest(), SweepObserved(all_gated({4: 0.1})))
    assert alone.actions == [ApproveTrial("beta-sweep-4", "sha256:4")]
    assert alone.status.winner == 4

    none = step(sweep_manifest(), SweepObserved(all_gated({})))
    assert none.status.phase == "Failed"
    assert none.status.message == "no trial passed its gate; nothing is promoted"
    assert none.actions == []


def test_without_a_promotion_the_sweep_ends_when_its_winner_is_chosen() -> None:
    manifest = sweep_manifest()
    del manifest["spec"]["template"]["promotion"]
    decided = step(manifest, SweepObserved(all_gated({2: 0.1})))
    assert decided.actions == []
    assert (decided.status.phase, decided.status.winner) == ("Succeeded", 2)


def test_a_chooser_that_failed_fails_the_sweep_with_its_words() -> None:
    failure = '{"status":"bad-input","message":"trial 5: no held-out pair margins"}'
    observed = SweepObserved(all_gated({3: 0.1, 5: 0.3}), SeenChooser("Failed", failure))
    decided = step(sweep_manifest(), observed)
    assert decided.status.phase == "Failed"
    assert decided.status.message == (
        "the chooser pod ended Failed: trial 5: no held-out pair margins"
    )


def test_sixty_four_comparisons_fit_the_termination_message() -> None:
    margins = {n: [0.1 * n + 0.001 * (i % 9) for i in range(100)] for n in range(1, 65)}
    text = termination_message_json(choose_winner(margins, 0.95))
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    kept = SweepChoice.model_validate_json(text)
    assert kept.winner == 64
    assert kept.compared[0].number == 64, "the winner is kept; then the closest trials"


def training(
    number: int, low: float, high: float, stopped: str | None = None, at: int = 10
) -> SeenTrial:
    """A trial in training whose evaluation at step `at` put its held-out margin in [low,
    high]."""
    return SeenTrial(
        number,
        f"beta-sweep-{number}",
        "Training",
        (low + high) / 2,
        None,
        None,
        False,
        (low, high),
        Rung(step=at, low=low, high=high),
        stopped,
    )


def stops_of(decided: SweepDecision) -> list[StopTrial]:
    return [a for a in decided.actions if isinstance(a, StopTrial)]


def test_a_trial_clearly_worse_at_the_same_step_is_stopped_and_frees_its_place() -> None:
    # Per unit of beta (both 0.05) at step 10: trial 1 is in [0.8, 1.2], trial 2 in [0.1, 0.2].
    observed = SweepObserved({1: training(1, 0.04, 0.06), 2: training(2, 0.005, 0.01)})
    decided = step(sweep_manifest(), observed)
    stops = stops_of(decided)
    assert [s.name for s in stops] == ["beta-sweep-2"]
    assert stops[0].reason == (
        "held-out margin per beta at step 10 at most 0.2 (upper bound at 95%), below trial 1's "
        "lower bound 0.8 at the same step: it cannot win"
    )
    assert CreateTrial(3) in decided.actions, "its place goes to the next trial"
    assert (decided.status.stopped, decided.status.running) == (1, 2)
    first, second = decided.status.trials[:2]
    assert second.stopped == stops[0].reason
    assert (first.reward_margin_low, first.reward_margin_high) == (0.04, 0.06)
    assert [r.step for r in first.rungs] == [10], "each evaluation seen is kept"
    assert "TrialStopped" in [e.reason for e in decided.events]

    # Once stopped (the annotation), it stays stopped: never stopped twice, never restarted.
    again = SweepObserved(
        {1: training(1, 0.04, 0.06), 2: training(2, 0.005, 0.01, stopped=stops[0].reason)}
    )
    later = step(sweep_manifest(), again, decided)
    assert not stops_of(later)
    assert later.status.stopped == 1


def test_trials_are_compared_at_the_same_step_not_against_a_finished_trials_end() -> None:
    """Trial 1 finished (gated) with rungs at steps 10 and 60; trial 3, now at step 10, is
    below trial 1's end but above trial 1 at step 10: it goes on (a young trial is not cut
    against a grown one); at step 20, where trial 1 was clearly better, it is stopped."""
    manifest = sweep_manifest()
    grown = training(1, 0.01, 0.02, at=10)
    before = step(manifest, SweepObserved({1: grown}))
    grown = training(1, 0.09, 0.1, at=20)
    before = step(manifest, SweepObserved({1: grown}), before)
    grown = training(1, 0.2, 0.3, at=60)
    before = step(manifest, SweepObserved({1: grown}), before)
    assert [r.step for r in before.status.trials[0].rungs] == [10, 20, 60]
    gated_one = SeenTrial(1, "beta-sweep-1", "AwaitingApproval", 0.25, None, "Passed", False)

    young = training(3, 0.015, 0.03, at=10)  # per beta (0.1): [0.15, 0.3]; trial 1: [0.2, 0.4]
    decided = step(manifest, SweepObserved({1: gated_one, 3: young}), before)
    assert not stops_of(decided), "at step 10 the intervals overlap"

    older = training(3, 0.02, 0.03, at=20)  # per beta [0.2, 0.3]; trial 1 at 20: [1.8, 2.0]
    decided = step(manifest, SweepObserved({1: gated_one, 3: older}), decided)
    assert [s.name for s in stops_of(decided)] == ["beta-sweep-3"]
    assert "at step 20" in stops_of(decided)[0].reason


def test_overlapping_intervals_stop_nothing_and_bounds_compare_per_beta() -> None:
    # Trial 5 (beta 0.3): raw [0.15, 0.3] is [0.5, 1.0] per beta; trial 1 (beta 0.05): raw
    # [0.03, 0.06] is [0.6, 1.2]. They overlap, though the raw intervals do not.
    observed = SweepObserved({1: training(1, 0.03, 0.06), 5: training(5, 0.15, 0.3)})
    decided = step(sweep_manifest(maxParallel=3), observed)
    assert not stops_of(decided)


def test_a_rejected_trial_never_leads() -> None:
    # At step 10, per beta, trial 1 (rejected since) was in [1.8, 2.2]: it would stop trial 3
    # [0.2, 0.3] at the same step if it counted.
    manifest = sweep_manifest()
    before = step(manifest, SweepObserved({1: training(1, 0.09, 0.11)}))
    rejected = SeenTrial(1, "beta-sweep-1", "Rejected", 0.1, None, "Rejected", False)
    observed = SweepObserved({1: rejected, 3: training(3, 0.02, 0.03)})
    assert not stops_of(step(manifest, observed, before))
    # Were it gated instead, trial 3 would be stopped.
    gated_one = SeenTrial(1, "beta-sweep-1", "AwaitingApproval", 0.1, None, "Passed", False)
    observed = SweepObserved({1: gated_one, 3: training(3, 0.02, 0.03)})
    assert [s.name for s in stops_of(step(manifest, observed, before))] == ["beta-sweep-3"]
