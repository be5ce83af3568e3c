"""`dpo run SWEEP`: a DPOSweep's trials on this machine, one after the other, each through the
same lifecycle as any `dpo run` (train, then the gate), on one set of volumes so that the
reference log-probs are computed once; then the winner by a paired comparison on the held-out
pairs every trial's gate scored, and only the winner promoted.

Each trial carries the sweep's promotion in manual mode (`core.sweep.trial_manifest`), so it
stops at AwaitingApproval once its gate passed; the winner is then approved and run again in
its own run directory, which promotes it without training again (the trainer finds its finished
checkpoint), as `dpo run --approve` does.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import IO, Any, TypeVar

from dpo_contract.pod import EXIT_BAD_INPUT
from dpo_contract.reports import GateReport, TrainingReport
from dpo_contract.sweep import SweepChoice, choose_winner

from dpo_operator.api import DPOJob
from dpo_operator.core.storage import claims
from dpo_operator.core.sweep import Trial
from dpo_operator.local.executor import LocalOptions, LocalRun, run

GATE_REPORT = "eval.json"
TRAIN_REPORT = "train.json"
Report = TypeVar("Report", GateReport, TrainingReport)


def run_sweep(
    sweep_manifest: dict[str, Any], found: list[Trial], options: LocalOptions, out: IO[str]
) -> int:
    """Run every trial, say each one's result as it ends, choose and promote the winner."""

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    promotion = sweep_manifest["spec"]["template"].get("promotion")
    name = sweep_manifest["metadata"]["name"]
    say(f"DPOSweep {name}: {len(found)} trials, one at a time on this machine")
    rows: list[str] = []
    gated: dict[int, GateReport] = {}
    for trial in found:
        job = trial.job
        say(f"\n--- trial {trial.number} ({trial.describe()}): {job.name}")
        ran: list[LocalRun] = []
        run(job, _trial_options(job, trial.number, options), out=out, summarize=ran.append)
        where = ran[-1].artifacts_dir
        gate = _report(where / GATE_REPORT, GateReport)
        train = _report(where / TRAIN_REPORT, TrainingReport)
        if gate is not None and gate.verdict == "Passed" and gate.pair_margins:
            gated[trial.number] = gate
        rows.append(_row(trial, gate, train))
        say("\n".join(["", "trial  settings", *rows]))
    if not gated:
        say(f"\nDPOSweep {name}: no trial passed its gate; nothing is promoted")
        return EXIT_BAD_INPUT
    confidence = next(iter(gated.values())).confidence
    # Per unit of beta: the reward margin is beta times the log-probability ratio margin, so a
    # larger beta alone would look better.
    betas = {trial.number: trial.job.spec.dpo.beta for trial in found}
    choice = choose_winner(
        {n: [m / betas[n] for m in g.pair_margins] for n, g in gated.items()}, confidence
    )
    say("")
    say(_verdict(choice, found))
    if promotion is None:
        return 0
    winner = next(trial.job for trial in found if trial.number == choice.winner)
    say(f"promoting trial {choice.winner} ({winner.name}) to {promotion['target']}")
    options = replace(_trial_options(winner, choice.winner, options), approve=True)
    return run(winner, options, out=out)


def _trial_options(job: DPOJob, number: int, options: LocalOptions) -> LocalOptions:
    """The trial's own run directory; the sweep's volumes, shared by every trial."""
    volumes = {
        claim: options.volumes.get(claim, options.workdir / "volumes" / claim)
        for claim in claims(job)
    }
    workdir = options.workdir / f"trial-{number}"
    return LocalOptions(workdir=workdir, volumes=volumes, cpu=options.cpu)


def _report(path: Path, kind: type[Report]) -> Report | None:
    return kind.model_validate_json(path.read_text()) if path.exists() else None


def _row(trial: Trial, gate: GateReport | None, train: TrainingReport | None) -> str:
    verdict = gate.verdict if gate is not None else "no gate"
    margin = ""
    if gate is not None:
        ratio = gate.metrics["rewardMargin"] / trial.job.spec.dpo.beta
        margin = f"held-out margin {gate.metrics['rewardMargin']:.3g} ({ratio:.3g} per beta)"
    reference = ""
    if train is not None and train.reference_log_probs:
        reused = all(entry.reused for entry in train.reference_log_probs)
        reference = "reference reused" if reused else "reference computed"
    return f"{trial.number:<6} {trial.describe():<40} {verdict:<12} {margin}  {reference}"


def _verdict(choice: SweepChoice, found: list[Trial]) -> str:
    described = {t.number: t.describe() for t in found}
    lines = [
        f"winner  trial {choice.winner} ({described[choice.winner]}): the highest held-out "
        f"margin per beta; against each other trial, pair by pair ({choice.confidence:.0%} "
        "interval of the winner's margin per beta minus the other's):"
    ]
    lines += [f"  {c.describe()}" for c in choice.compared if c.difference is not None]
    if choice.tied:
        lines.append(
            "  a tie keeps the higher mean as the winner; the tied trials keep their artifacts"
        )
    return "\n".join(lines)
