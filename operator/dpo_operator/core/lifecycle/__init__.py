"""The DPOJob lifecycle: `decide(job, observed) -> Decision` is the only place that decides (see
`machine`).
"""

from dpo_operator.core.lifecycle.decision import (
    Action,
    Create,
    Decision,
    Delete,
    DeleteChildren,
    Event,
    Executor,
    Suspend,
    Update,
)
from dpo_operator.core.lifecycle.machine import (
    decide,
)
from dpo_operator.core.lifecycle.observed import (
    APPROVE_ANNOTATION,
    EVENTFUL_PHASES,
    STOP_ANNOTATION,
    ChildJob,
    Component,
    JobState,
    Observed,
    PodState,
)
from dpo_operator.core.lifecycle.refusal import REFUSED_AS, RefusalReason, refuse
from dpo_operator.core.lifecycle.timing import active_seconds, requeue_after

__all__ = [
    "APPROVE_ANNOTATION",
    "EVENTFUL_PHASES",
    "REFUSED_AS",
    "STOP_ANNOTATION",
    "Action",
    "ChildJob",
    "Component",
    "Create",
    "Decision",
    "Delete",
    "DeleteChildren",
    "Event",
    "Executor",
    "JobState",
    "Observed",
    "PodState",
    "RefusalReason",
    "Suspend",
    "Update",
    "active_seconds",
    "decide",
    "refuse",
    "requeue_after",
]
