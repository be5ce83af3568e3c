"""A pod's termination message: one of the trainer's reports, told apart by its `status`,
written by the trainer and parsed once by the operator and by `dpo run`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, TypeAdapter, ValidationError

from dpo_contract.reports import (
    Failure,
    GateVerdict,
    ModelReport,
    PromotionResult,
    TrainingSummary,
)
from dpo_contract.sweep import SweepChoice

TerminationMessage = Annotated[
    TrainingSummary | GateVerdict | PromotionResult | ModelReport | SweepChoice | Failure,
    Field(discriminator="status"),
]
_TERMINATION_MESSAGE: TypeAdapter[TerminationMessage] = TypeAdapter(TerminationMessage)


TERMINATION_MESSAGE_LIMIT = 4096  # what the kubelet keeps of a termination message


def termination_message_json(message: TerminationMessage) -> str:
    """A termination message as the trainer writes it: no null fields; a failure's message cut
    to fit the kubelet's limit, and a sweep's choice kept to the trials closest to the winner."""
    text = message.model_dump_json(by_alias=True, exclude_none=True)
    if isinstance(message, SweepChoice):
        closest = sorted(message.compared, key=lambda c: c.difference or 0.0)
        while len(text.encode()) > TERMINATION_MESSAGE_LIMIT:
            closest.pop()
            text = message.model_copy(update={"compared": closest}).model_dump_json(
                by_alias=True, exclude_none=True
            )
    if len(text.encode()) > TERMINATION_MESSAGE_LIMIT and isinstance(message, Failure):
        text = message.model_copy(update={"message": message.message[:3500]}).model_dump_json(
            by_alias=True, exclude_none=True
        )
    return text


def parse_termination_message(text: str) -> TerminationMessage | None:
    """A pod's termination message, or None when it is none of the trainer's (a crash, or a
    message cut short)."""
    try:
        return _TERMINATION_MESSAGE.validate_json(text)
    except ValidationError:
        return None
