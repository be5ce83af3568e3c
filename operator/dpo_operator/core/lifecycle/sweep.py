"""The DPOSweep lifecycle: `decide_sweep(sweep, trials, observed) -> SweepDecision`, pure, like
the DPOJob's `decide`.

    Running -> (Choosing) -> (Promoting) -> Succeeded | Failed

Running: trials are created in order, at most `maxParallel` unfinished at once (a trial is
finished once it is Rejected, Failed, Succeeded or, its gate passed, AwaitingApproval: every
trial's promotion waits for the sweep). Once every trial has finished, the winner among those
whose gate passed: the only one, or (Choosing) the chooser pod's paired comparison on the
held-out pairs. The sweep then approves the winner alone (Promoting) and is Succeeded when it
is; without a promotion, as soon as it is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from dpo_contract.reports import Failure
from dpo_contract.sweep import SweepChoice
from dpo_contract.termination import parse_termination_message

from dpo_operator.api import TERMINAL_PHASES
from dpo_operator.api.sweep import (
    MAX_RUNGS,
    DPOSweep,
    DPOSweepStatus,
    Rung,
    SweepPhase,
    TrialStatus,
)
from dpo_operator.core.lifecycle.decision import Event
from dpo_operator.core.sweep import Trial

# A trial has finished for the sweep once it ended or, its gate passed, waits for the sweep's
# approval (AwaitingApproval).
FINISHED_PHASES = TERMINAL_PHASES | {"AwaitingApproval"}


@dataclass(frozen=True)
class SeenTrial:
    """A trial's DPOJob as the sweep reads it."""

    number: int
    name: str
    phase: str | None
    reward_margin: float | None  # held-out: the gate's once scored, else the latest evaluation's
    reward_accuracy: float | None
    verdict: Literal["Passed", "Rejected", "Inconclusive"] | None
    approved: bool
    interval: tuple[float, float] | None = None  # the held-out margin's, as reward_margin
    rung: Rung | None = None  # the latest evaluation's interval, while it trains
    stopped: str | None = None  # why the sweep stopped it
    adapter_digest: str | None = None  # the adapter its gate judged

    @property
    def finished(self) -> bool:
        """Trained and gated (or ended before, or stopped): the sweep approves only a finished
        trial, and the approved one stays finished while it promotes."""
        return self.phase in FINISHED_PHASES or self.approved or self.stopped is not None


@dataclass(frozen=True)
class SeenChooser:
    """The chooser Job: Pending, Running, Complete or Failed, and its pod's termination
    message."""

    state: Literal["Pending", "Running", "Complete", "Failed"]
    message: str = ""


@dataclass(frozen=True)
class SweepObserved:
    trials: dict[int, SeenTrial]  # by trial number: the trials that exist
    chooser: SeenChooser | None = None


@dataclass(frozen=True)
class CreateTrial:
    number: int


@dataclass(frozen=True)
class CreateChooser:
    """The chooser pod, comparing these trials (every one whose gate passed)."""

    numbers: tuple[int, ...]


@dataclass(frozen=True)
class ApproveTrial:
    """Approve the adapter the trial's gate passed (its digest), as a person would."""

    name: str
    adapter_digest: str


@dataclass(frozen=True)
class StopTrial:
    """End a trial early (`dpo.dev/stop`: its Jobs deleted, its GPUs back, why said on it)."""

    name: str
    reason: str


SweepAction = CreateTrial | CreateChooser | ApproveTrial | StopTrial


@dataclass
class SweepDecision:
    status: DPOSweepStatus
    actions: list[SweepAction] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


def decide_sweep(sweep: DPOSweep, found: list[Trial], observed: SweepObserved) -> SweepDecision:
    """What to do next for `sweep`, whose trials are `found` (all of them, in order) and of
    which `observed.trials` exist."""
    before = sweep.status or DPOSweepStatus()
    status = DPOSweepStatus(
        total=len(found), winner=before.winner, comparisons=list(before.comparisons)
    )
    decision = SweepDecision(status)
    # A trial stopped by an earlier decision whose annotation the cache does not show yet.
    said_stopped = {row.number: row.stopped for row in before.trials if row.stopped}
    seen = {
        n: replace(s, stopped=s.stopped or said_stopped.get(n)) for n, s in observed.trials.items()
    }
    rungs = {row.number: row.rungs for row in before.trials}
    status.trials = [_row(t, seen.get(t.number), rungs.get(t.number, [])) for t in found]
    for stop in _clearly_worse(found, seen, status.trials):
        decision.actions.append(stop)
        number = next(n for n, s in seen.items() if s.name == stop.name)
        seen = {**seen, number: replace(seen[number], stopped=stop.reason)}
        status.trials[number - 1].stopped = stop.reason
        decision.events.append(Event("Normal", "TrialStopped", f"trial {number}: {stop.reason}"))
    status.done = sum(1 for s in seen.values() if s.finished)
    status.running = len(seen) - status.done
    status.stopped = sum(1 for s in seen.values() if s.stopped is not None)
    status.best = _best(found, seen)
    old = {row.number: row.phase for row in before.trials}
    for row in status.trials:
        if row.phase != old.get(row.number) and row.phase in FINISHED_PHASES:
            said = f"trial {row.number} ({row.settings}): {row.phase}"
            if row.verdict is not None:
                said += f", gate {row.verdict}"
            if row.reward_margin is not None:
                said += f", margin {row.reward_margin:.4g}"
            decision.events.append(Event("Normal", "TrialFinished", said))

    waiting = [t for t in found if t.number not in seen]
    room = sweep.spec.max_parallel - status.running
    for trial in waiting[: max(room, 0)]:
        decision.actions.append(CreateTrial(trial.number))
        status.running += 1
        decision.events.append(
            Event("Normal", "TrialCreated", f"trial {trial.number} ({trial.describe()})")
        )
    if waiting or status.done < len(found):
        _phase(decision, before, "Running", f"{status.done} of {len(found)} trials finished")
        return decision

    if status.winner is None:
        passed = tuple(sorted(n for n, s in seen.items() if s.verdict == "Passed"))
        if not passed:
            _phase(decision, before, "Failed", "no trial passed its gate; nothing is promoted")
            return decision
        if len(passed) == 1:
            status.winner = passed[0]
        elif not _choose(decision, before, observed.chooser, passed):
            return decision
    winner = next(t for t in found if t.number == status.winner)
    chosen = f"trial {winner.number} ({winner.describe()}) won"
    if winner.job.spec.promotion is None:
        _phase(decision, before, "Succeeded", chosen)
        return decision
    promoted = seen[winner.number]
    if promoted.phase == "Succeeded":
        _phase(decision, before, "Succeeded", f"{chosen} and is promoted")
    elif promoted.phase in TERMINAL_PHASES:
        _phase(decision, before, "Failed", f"{chosen} but its promotion ended {promoted.phase}")
    else:
        if not promoted.approved:
            decision.actions.append(ApproveTrial(promoted.name, promoted.adapter_digest or ""))
        _phase(decision, before, "Promoting", f"{chosen}; promoting {promoted.name}")
    return decision


def _choose(
    decision: SweepDecision,
    before: DPOSweepStatus,
    chooser: SeenChooser | None,
    passed: tuple[int, ...],
) -> bool:
    """Runs the chooser, or reads its choice into the status; whether the winner is known."""
    status = decision.status
    if chooser is None:
        decision.actions.append(CreateChooser(passed))
    # A Complete Job whose pod's message the cache does not hold yet: its event comes next.
    if chooser is None or chooser.state in ("Pending", "Running") or not chooser.message:
        trials = ", ".join(str(n) for n in passed)
        _phase(decision, before, "Choosing", f"comparing trials {trials} on the held-out pairs")
        return False
    choice = parse_termination_message(chooser.message)
    if not isinstance(choice, SweepChoice):
        said = choice.message if isinstance(choice, Failure) else chooser.message
        _phase(decision, before, "Failed", f"the chooser pod ended {chooser.state}: {said}")
        return False
    status.winner = choice.winner
    status.comparisons = list(choice.compared)
    tied = ", ".join(str(n) for n in choice.tied)
    message = f"trial {choice.winner} has the highest held-out margin per beta"
    if tied:
        message += f"; tied within the interval with trial(s) {tied}: the higher mean wins"
    decision.events.append(Event("Normal", "WinnerChosen", message))
    return True


def _clearly_worse(
    found: list[Trial], seen: dict[int, SeenTrial], rows: list[TrialStatus]
) -> list[StopTrial]:
    """Trials still training that cannot win, compared at the same evaluation step (the rungs
    of successive halving, with intervals for the cut): at its latest evaluation a trial's
    held-out margin per unit of beta has an upper bound below the best lower bound any other
    trial (not failed or rejected) had at that same step. Stopping them frees their GPUs for
    the trials still waiting."""
    betas = {trial.number: trial.job.spec.dpo.beta for trial in found}
    # The trainer's intervals are at the gate's confidence, the same in every trial.
    confidence = found[0].job.spec.eval_gate.confidence
    per_beta = {
        row.number: {
            r.step: (r.low / betas[row.number], r.high / betas[row.number]) for r in row.rungs
        }
        for row in rows
        if row.number in seen and seen[row.number].phase not in ("Failed", "Rejected")
    }
    stops = []
    for number, trial in sorted(seen.items()):
        if trial.phase != "Training" or trial.stopped or trial.rung is None:
            continue
        step = trial.rung.step
        rivals = {n: at[step] for n, at in per_beta.items() if n != number and step in at}
        if not rivals or number not in per_beta:
            continue
        leader = max(rivals, key=lambda n: (rivals[n][0], -n))
        floor, high = rivals[leader][0], per_beta[number][step][1]
        if high < floor:
            stops.append(
                StopTrial(
                    trial.name,
                    f"held-out margin per beta at step {step} at most {high:.4g} (upper bound "
                    f"at {confidence:.0%}), below trial {leader}'s lower bound {floor:.4g} at "
                    "the same step: it cannot win",
                )
            )
    return stops


def _row(trial: Trial, seen: SeenTrial | None, rungs: list[Rung]) -> TrialStatus:
    """The trial's row; its rungs: those recorded before, and the latest evaluation's."""
    row = TrialStatus(
        number=trial.number,
        name=trial.manifest["metadata"]["name"],
        settings=trial.describe(),
        rungs=rungs,
    )
    if seen is not None and seen.rung is not None and all(r.step != seen.rung.step for r in rungs):
        row.rungs = [*rungs, seen.rung][-MAX_RUNGS:]
    if seen is not None:
        row.phase = seen.phase  # type: ignore[assignment]
        row.reward_margin = seen.reward_margin
        if seen.interval is not None:
            row.reward_margin_low, row.reward_margin_high = seen.interval
        row.reward_accuracy = seen.reward_accuracy
        row.verdict = seen.verdict
        row.stopped = seen.stopped
    return row


def _best(found: list[Trial], seen: dict[int, SeenTrial]) -> str | None:
    """The trial with the highest held-out margin per beta among those whose gate passed."""
    betas = {trial.number: trial.job.spec.dpo.beta for trial in found}
    scored = [
        (s.reward_margin / betas[n], n)
        for n, s in seen.items()
        if s.verdict == "Passed" and s.reward_margin is not None
    ]
    if not scored:
        return None
    per_beta, number = max(scored, key=lambda item: (item[0], -item[1]))
    return f"{number}: {per_beta:.4g}/beta"


def _phase(
    decision: SweepDecision, before: DPOSweepStatus, phase: SweepPhase, message: str
) -> None:
    status = decision.status
    if before.phase != phase and phase != "Running":
        warning = phase == "Failed"
        decision.events.append(Event("Warning" if warning else "Normal", phase, message))
    status.phase = phase
    status.message = message
