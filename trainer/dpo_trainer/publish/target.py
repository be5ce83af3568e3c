"""What a promotion publishes, and the interface every kind of promotion target implements."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dpo_contract.config import JobIdentity
from dpo_contract.reports import GateReport, PromotionResult


@dataclass(frozen=True)
class Publication:
    """What a promotion publishes, and under which names."""

    adapter: Path
    adapter_digest: str
    version: str
    served_model_name: str
    report: GateReport
    job: JobIdentity

    @property
    def report_json(self) -> bytes:
        """eval.json as the gate wrote it."""
        return (self.report.model_dump_json(by_alias=True, indent=2) + "\n").encode()


class PromotionTarget(Protocol):
    """Where promoted adapters live. `publish` leaves the target's `current` naming the
    publication's adapter (or, for a gate that beat a champion, fails if `current` moved on
    meanwhile) and returns that pointer; publishing the same adapter again changes nothing."""

    def publish(self, publication: Publication) -> PromotionResult: ...
