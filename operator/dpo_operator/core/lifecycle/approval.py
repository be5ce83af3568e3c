"""A manual promotion's approval: it counts only when given after the gate's verdict, for the
adapter the gate judged. The annotation names that adapter's digest, which nobody can know
before the verdict; any other value (a "true" set with the manifest, an older adapter's digest)
is ignored, and an Event says so once.
"""

from __future__ import annotations

from dpo_operator.api import DPOJobStatus
from dpo_operator.core.lifecycle.observed import APPROVE_ANNOTATION
from dpo_operator.core.lifecycle.recording import Recorder


def gated_digest(status: DPOJobStatus) -> str:
    """The digest of the adapter the gate judged ("" before it did)."""
    evaluation = status.evaluation
    return (evaluation.adapter_digest if evaluation else None) or ""


def how_to_approve(name: str, status: DPOJobStatus) -> str:
    digest = gated_digest(status)
    return (
        f"the gate passed adapter {digest}; approve it with: kubectl annotate --overwrite dpo "
        f"{name} {APPROVE_ANNOTATION}={digest}"
    )


def approved(recording: Recorder) -> bool:
    """Whether the job's approval names the adapter its gate passed; records why not."""
    given = recording.job.metadata.annotations.get(APPROVE_ANNOTATION)
    digest = gated_digest(recording.status)
    if given is None:
        return False
    if digest and given == digest:
        if recording.holds("ApprovalIgnored"):
            recording.condition("ApprovalIgnored", False, "Approved", f"approved: {digest}")
        return True
    said = (
        f"{APPROVE_ANNOTATION}={given} does not approve the adapter the gate passed "
        f"({digest}): only an approval given after the verdict, naming that adapter, counts"
    )
    previous = recording.current("ApprovalIgnored")
    if previous is None or previous.status != "True" or previous.message != said:
        recording.event("ApprovalIgnored", said, warning=True)
    recording.condition("ApprovalIgnored", True, "NotThisAdapter", said)
    return False
