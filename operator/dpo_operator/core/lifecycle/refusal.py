"""A DPOJob the operator will not run: its spec is invalid (InvalidSpec), or the installation
does not allow it (NotAllowed). Said once per change of the spec, in a SpecValid=False
condition and a Warning event; retrying cannot help until the spec changes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from dpo_operator.api import Condition, DPOJobStatus
from dpo_operator.core.lifecycle.decision import Decision, Event

RefusalReason = Literal["InvalidSpec", "NotAllowed"]
REFUSED_AS: dict[RefusalReason, str] = {
    "InvalidSpec": "invalid spec",
    "NotAllowed": "not allowed here",
}


def refuse(
    status: DPOJobStatus,
    generation: int | None,
    problems: Sequence[str],
    reason: RefusalReason,
    now: datetime,
) -> Decision | None:
    """The status and event that say why; None when the status says so already."""
    message = "; ".join(problems)
    if any(c.type == "SpecValid" and c.message == message for c in status.conditions):
        return None
    refused = status.model_copy(deep=True)
    condition = Condition(
        type="SpecValid",
        status="False",
        reason=reason,
        message=message,
        last_transition_time=now.replace(microsecond=0),
        observed_generation=generation,
    )
    refused.conditions = [c for c in status.conditions if c.type != "SpecValid"] + [condition]
    refused.phase = status.phase or "Pending"
    refused.message = f"{REFUSED_AS[reason]}: {message}"
    return Decision(refused, events=[Event("Warning", reason, message)])
