"""`dpo-trainer choose`: a DPOSweep's winner among the trials whose gate passed, from the
held-out margin of every pair each gate scored (their eval.json), compared pair against pair
per unit of beta (`dpo_contract.sweep.choose_winner`)."""

from __future__ import annotations

from dataclasses import dataclass

from dpo_contract.pod import BadInputError
from dpo_contract.reports import GateReport
from dpo_contract.sweep import SweepChoice, choose_winner

from dpo_trainer.io.artifacts import EVAL_REPORT, Artifacts


class ChooseError(BadInputError):
    """A trial's report is missing or cannot be compared: no retry changes that."""


@dataclass(frozen=True)
class GatedTrial:
    number: int
    artifacts: str  # the trial's artifacts directory (a path or a URI)
    beta: float

    @classmethod
    def parse(cls, text: str) -> GatedTrial:
        """`N=ARTIFACTS@BETA`, as the operator writes it."""
        number, _, rest = text.partition("=")
        artifacts, _, beta = rest.rpartition("@")
        if not number.isdigit() or not artifacts or not beta:
            raise ChooseError(f"--trial {text!r}: expected N=ARTIFACTS_DIR@BETA")
        return cls(int(number), artifacts, float(beta))


def choose(trials: list[GatedTrial]) -> SweepChoice:
    margins: dict[int, list[float]] = {}
    confidences: set[float] = set()
    for trial in trials:
        report = Artifacts(trial.artifacts).read_report(EVAL_REPORT, GateReport)
        if report is None or not report.pair_margins:
            raise ChooseError(
                f"trial {trial.number}: no held-out pair margins in "
                f"{trial.artifacts}/{EVAL_REPORT}; its gate must have run with this trainer "
                "version"
            )
        margins[trial.number] = [margin / trial.beta for margin in report.pair_margins]
        confidences.add(report.confidence)
    try:
        return choose_winner(margins, min(confidences))
    except ValueError as error:
        raise ChooseError(str(error)) from error
