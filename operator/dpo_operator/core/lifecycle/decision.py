"""What the lifecycle returns: the actions an executor carries out, the events it posts, the
new status and when to look again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

from dpo_operator.api import DPOJobStatus

Context = TypeVar("Context", contravariant=True)
Result = TypeVar("Result", covariant=True)
R = TypeVar("R")
C = TypeVar("C")


class Executor(Protocol[Context, Result]):
    """What carries out the lifecycle's actions: the Kubernetes executor (`Result` an awaitable)
    and the local one (`dpo run`). `Context` is what the executor needs beside the action (the
    DPOJob, and on Kubernetes the uids of the children it owns). Each action calls the method
    for its own type (`Action.carry_out`), so an executor that misses one is a type error."""

    def create(self, context: Context, action: Create) -> Result: ...

    def update(self, context: Context, action: Update) -> Result: ...

    def delete(self, context: Context, action: Delete) -> Result: ...

    def suspend(self, context: Context, action: Suspend) -> Result: ...

    def delete_children(self, context: Context, action: DeleteChildren) -> Result: ...


@dataclass(frozen=True)
class Create:
    """Create a child: the config map, the service, the namespace's NetworkPolicy, the model
    initializer, or a Job of `attempt`."""

    kind: Literal["config", "service", "network-policy", "init", "train", "eval", "promote"]
    attempt: int = 0

    def carry_out(self, executor: Executor[C, R], context: C) -> R:
        return executor.create(context, self)


@dataclass(frozen=True)
class Update:
    """Render the ConfigMap again from the current spec (it was rendered before an edit)."""

    kind: Literal["config"] = "config"

    def carry_out(self, executor: Executor[C, R], context: C) -> R:
        return executor.update(context, self)


@dataclass(frozen=True)
class Delete:
    job: str

    def carry_out(self, executor: Executor[C, R], context: C) -> R:
        return executor.delete(context, self)


@dataclass(frozen=True)
class Suspend:
    job: str
    suspend: bool

    def carry_out(self, executor: Executor[C, R], context: C) -> R:
        return executor.suspend(context, self)


@dataclass(frozen=True)
class DeleteChildren:
    """ttlSecondsAfterFinished: remove the child Jobs named here, the ConfigMap and the
    Service; the DPOJob record stays."""

    jobs: tuple[str, ...]

    def carry_out(self, executor: Executor[C, R], context: C) -> R:
        return executor.delete_children(context, self)


Action = Create | Update | Delete | Suspend | DeleteChildren


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Decision:
    status: DPOJobStatus
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    # Seconds until time itself changes something (a metrics scrape, a deadline, a TTL); None
    # when only a change in the cluster can.
    requeue_after: float | None = None
