"""What the lifecycle reads of the cluster: the child Jobs with their pods, and the rest of
`Observed` (the time, the latest metrics, what exists, a child the API server refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from dpo_contract.reports import FabricSummary, Failure
from dpo_contract.termination import TerminationMessage, parse_termination_message

from dpo_operator.api import TrainingMetrics
from dpo_operator.core.topology import NodeCapacity

Component = Literal["init", "train", "eval", "promote"]
JobState = Literal["Pending", "Running", "Complete", "Failed"]
APPROVE_ANNOTATION = "dpo.dev/approve"
# Ends a run early, its Jobs deleted and its checkpoints kept; the value says why (a DPOSweep
# stopping a trial that cannot win, or a person).
STOP_ANNOTATION = "dpo.dev/stop"
EVENTFUL_PHASES = frozenset(
    {"Queued", "Suspended", "AwaitingApproval", "Succeeded", "Rejected", "Failed", "Stopped"}
)


@dataclass(frozen=True)
class PodState:
    """What a pod's status says: phase, the main container's exit code and message."""

    name: str
    phase: str
    exit_code: int | None = None
    message: str = ""  # the termination message, as the trainer wrote it
    disrupted: bool = False  # DisruptionTarget: preempted or evicted, not the pod's fault
    # Why a Pending pod is not running, as the kubelet or scheduler says it: the reason
    # (ImagePullBackOff, CreateContainerConfigError, Unschedulable, ...) and its message.
    waiting_reason: str = ""
    waiting_message: str = ""

    @property
    def reported(self) -> TerminationMessage | None:
        return parse_termination_message(self.message) if self.message else None


@dataclass(frozen=True)
class ChildJob:
    name: str
    component: Component
    attempt: int
    suspended: bool
    state: JobState
    deleting: bool = False
    pods: tuple[PodState, ...] = ()
    spec_digest: str = ""  # of the spec it was rendered from (api.spec_digest); "" if unknown


@dataclass(frozen=True)
class Observed:
    now: datetime
    jobs: tuple[ChildJob, ...] = ()
    has_config_map: bool = False
    has_service: bool = False
    config_spec_digest: str | None = None  # of the spec the ConfigMap was rendered from
    # The namespace's NetworkPolicy fencing the trainers (or none is wanted, or none applies).
    has_network_policy: bool = True
    metrics: TrainingMetrics | None = None
    fabric: FabricSummary | None = None  # what rank 0's preflight measured, once it has
    # The cluster's Nodes, where the first training Job must fit in one topology domain (else
    # None: not needed, or not known, as on this machine).
    nodes: tuple[NodeCapacity, ...] | None = None
    # The API server refused to create a child as rendered, in its words (or its name is taken
    # by someone else's object): the run cannot go on.
    refused: str | None = None


def telling_pod(child: ChildJob) -> PodState | None:
    """The pod whose termination tells the Job's story: of a completed Job the pod that
    succeeded (earlier tries may have failed), of a failed one the last pod that failed."""
    wanted = "Succeeded" if child.state == "Complete" else "Failed"
    candidates = [p for p in child.pods if p.phase == wanted and not p.disrupted]
    candidates = candidates or [p for p in child.pods if p.phase in ("Succeeded", "Failed")]
    return candidates[-1] if candidates else None


def reason_of(pod: PodState | None) -> str:
    """What went wrong, in the trainer's words where it said."""
    if pod is None:
        return "no pod finished"
    reported = pod.reported
    if isinstance(reported, Failure):
        return reported.message[:2000]
    return (pod.message or f"exit code {pod.exit_code}, no termination message")[:2000]
