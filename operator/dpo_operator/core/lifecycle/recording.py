"""How a decision is written down: the actions, the events, the phase and the conditions of the
new status. The state machine says what; this says it the same way every time."""

from __future__ import annotations

from datetime import datetime

from dpo_operator.api import Condition, DPOJob, Phase
from dpo_operator.core.lifecycle.decision import Action, Decision, Event
from dpo_operator.core.lifecycle.observed import EVENTFUL_PHASES


class Recorder:
    def __init__(self, job: DPOJob, decision: Decision, now: datetime) -> None:
        self.job = job
        self.decision = decision
        self.status = decision.status
        self.now = now

    def act(self, action: Action) -> None:
        self.decision.actions.append(action)

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        self.decision.events.append(Event("Warning" if warning else "Normal", reason, message))

    def phase(self, phase: Phase, message: str, reason: str | None = None) -> None:
        # Routine progress is in status; an Event marks what a person may need to act on, or
        # the end. (Each Event is one more write to the API server.)
        if self.status.phase != phase and phase in EVENTFUL_PHASES:
            self.event(reason or phase, message, warning=phase in ("Failed", "Rejected"))
        self.status.phase = phase
        self.status.message = message

    def current(self, kind: str) -> Condition | None:
        """The status's condition of type `kind`, if it has one."""
        return next((c for c in self.status.conditions if c.type == kind), None)

    def holds(self, kind: str) -> bool:
        """Whether the status's condition `kind` is True."""
        condition = self.current(kind)
        return condition is not None and condition.status == "True"

    def condition(self, kind: str, value: bool, reason: str, message: str) -> None:
        wanted = "True" if value else "False"
        existing = self.current(kind)
        since = self.now
        if existing is not None and existing.status == wanted:
            since = existing.last_transition_time or self.now
        updated = Condition(
            type=kind,
            status=wanted,
            reason=reason,
            message=message,
            last_transition_time=since,
            observed_generation=self.job.metadata.generation,
        )
        # In place: the order of conditions is part of the status, and a needless change is a
        # needless write.
        kinds = [c.type for c in self.status.conditions]
        if kind in kinds:
            self.status.conditions[kinds.index(kind)] = updated
        else:
            self.status.conditions.append(updated)
