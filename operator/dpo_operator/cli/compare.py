"""`dpo compare RUN...`: runs side by side, to choose among a sweep in one command.

Prints the settings that differ, the final training and held-out metrics, the gate's criteria
with their intervals, and the health signals of each run, and writes one PNG of their curves
(loss, reward accuracy and margin against steps; held-out dashed).

A RUN is one of:
    DIR                        a `dpo run` directory (it holds trainer.json)
    DIR or URI                 a run's artifacts (<output>/<namespace>/<name>/<uid>, train.json)
    dpojob/[NAMESPACE/]NAME    a DPOJob, read with kubectl; its curves come from its artifacts
                               where this machine can read its output (not a PVC)
    dposweep/[NAMESPACE/]NAME  every trial of a DPOSweep, as DPOJobs, and the sweep's verdict:
                               the stopped trials and why, the winner and its paired comparison
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_contract.config import TrainerConfig
from dpo_contract.reports import GateCriterion, GateReport, TrainingReport
from pydantic import ValidationError

from dpo_operator.api.sweep import DPOSweepStatus
from dpo_operator.cli.report import describe_criterion, plot_curves
from dpo_operator.core.render import trainer_config
from dpo_operator.core.resolve import resolve
from dpo_operator.core.storage import artifacts_dir
from dpo_operator.core.sweep import SWEEP_LABEL, TRIAL_LABEL
from dpo_operator.core.validate import parse_dpojob

DPOJOB_PREFIX = "dpojob/"
SWEEP_PREFIX = "dposweep/"
# Differ between any two runs without being a choice: not shown as settings.
NOT_SETTINGS = ("job.", "artifactsDir", "metricsPort", "referenceCache")
FINAL_METRICS = (
    ("loss", "dpo_train_loss"),
    ("reward accuracy", "dpo_train_reward_accuracy"),
    ("reward margin", "dpo_train_reward_margin"),
)
HELD_OUT_METRICS = (
    ("loss", "eval_loss"),
    ("reward accuracy", "eval_rewards/accuracies"),
    ("reward margin", "eval_rewards/margins"),
)


class RunNotFoundError(Exception):
    """A RUN that names no run; the message says what was looked for and what to give."""


@dataclass
class ComparedRun:
    label: str
    settings: dict[str, Any] = field(default_factory=dict)
    training: TrainingReport | None = None
    gate: GateReport | None = None
    # From the gate report, or a DPOJob's status when its report cannot be read from here.
    verdict: str | None = None
    criteria: list[GateCriterion] = field(default_factory=list)
    phase: str | None = None
    notes: list[str] = field(default_factory=list)


# -- reading runs (the edge) -------------------------------------------------------------------


Kubectl = Callable[[list[str]], str]


def kubectl(arguments: list[str]) -> str:
    result = subprocess.run(["kubectl", *arguments], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RunNotFoundError(f"kubectl {' '.join(arguments)}: {result.stderr.strip()}")
    return result.stdout


def load_run(run: str, get: Kubectl = kubectl) -> ComparedRun:
    """The run `run` names (see the module's docstring)."""
    if run.startswith(DPOJOB_PREFIX):
        return _load_dpojob(run, get)
    local = Path(run)
    if (local / "trainer.json").is_file():  # a `dpo run` directory
        config = TrainerConfig.model_validate_json((local / "trainer.json").read_text())
        compared = _load_artifacts(local.name, config.artifacts_dir)
        compared.settings = settings_of(config)
        return compared
    compared = _load_artifacts(local.name if "://" not in run else run.rstrip("/"), run)
    if compared.training is not None and compared.training.settings is not None:
        compared.settings = settings_of(compared.training.settings)
    if compared.training is None:
        raise RunNotFoundError(
            f"{run}: no trainer.json (a `dpo run` directory) or train.json (a run's artifacts); "
            f"give one of those, or {DPOJOB_PREFIX}[NAMESPACE/]NAME for a DPOJob"
        )
    return compared


def _named(run: str, prefix: str) -> tuple[str, list[str]]:
    """The name in `prefix[NAMESPACE/]NAME`, and kubectl's namespace arguments."""
    parts = run.removeprefix(prefix).split("/")
    return parts[-1], ["-n", parts[0]] if len(parts) == 2 else []


def _load_dpojob(run: str, get: Kubectl) -> ComparedRun:
    name, namespace_args = _named(run, DPOJOB_PREFIX)
    body = json.loads(get(["get", "dpojobs.dpo.dev", name, *namespace_args, "-o", "json"]))
    return _compared_dpojob(run, body)


def load_sweep(run: str, get: Kubectl = kubectl) -> tuple[list[ComparedRun], list[str]]:
    """Every trial of the DPOSweep `run` names, in order, and what the sweep said of them."""
    name, namespace_args = _named(run, SWEEP_PREFIX)
    sweep = json.loads(get(["get", "dposweeps.dpo.dev", name, *namespace_args, "-o", "json"]))
    listed = json.loads(
        get(
            ["get", "dpojobs.dpo.dev", "-l", f"{SWEEP_LABEL}={name}", *namespace_args, "-o", "json"]
        )
    )
    try:
        status = DPOSweepStatus.model_validate(sweep.get("status") or {})
    except ValidationError as error:
        raise RunNotFoundError(f"{run}: not a DPOSweep this release reads: {error}") from None
    trials = sorted(listed["items"], key=lambda body: int(body["metadata"]["labels"][TRIAL_LABEL]))
    if not trials:
        raise RunNotFoundError(f"{run}: the sweep has no trials yet (phase {status.phase})")
    return [_compared_dpojob(run, body) for body in trials], sweep_lines(name, status)


def sweep_lines(name: str, status: DPOSweepStatus) -> list[str]:
    """What a sweep's status says of its trials: settings, stops, the winner and ties."""
    lines = [f"sweep {name}: {status.phase or 'Pending'}: {status.message or ''}".rstrip(": ")]
    for row in status.trials:
        said = f"  trial {row.number} ({row.settings}): {row.phase or 'not started'}"
        if row.reward_margin is not None:
            said += f", held-out margin {row.reward_margin:.4g}"
            if row.reward_margin_low is not None and row.reward_margin_high is not None:
                said += f" [{row.reward_margin_low:.4g}, {row.reward_margin_high:.4g}]"
        if row.stopped:
            said += f"; stopped: {row.stopped}"
        lines.append(said)
    if status.winner is not None:
        lines.append(
            f"  winner: trial {status.winner}; against each other gated trial, pair by pair, "
            "the winner's held-out margin per beta minus the other's:"
        )
    lines += [f"    {c.describe()}" for c in status.comparisons if c.difference is not None]
    return lines


def _compared_dpojob(run: str, body: dict[str, Any]) -> ComparedRun:
    try:
        job = parse_dpojob(body, check_rules=False)
    except ValidationError as error:
        raise RunNotFoundError(f"{run}: not a DPOJob this release reads: {error}") from None
    output = artifacts_dir(job)
    if job.spec.output.uri.startswith("pvc://"):
        compared = ComparedRun(job.name)
        compared.notes.append(f"{output} is on a PVC: curves and reports not readable here")
    else:
        compared = _load_artifacts(job.name, output)
    compared.settings = settings_of(trainer_config(resolve(job)))
    status = job.status
    if status is not None:
        compared.phase = status.phase
        if compared.gate is None and status.evaluation is not None:
            compared.verdict = status.evaluation.verdict
            compared.criteria = list(status.evaluation.criteria)
    return compared


def _load_artifacts(label: str, uri: str) -> ComparedRun:
    compared = ComparedRun(label)
    training = _read(uri, "train.json")
    gate = _read(uri, "eval.json")
    compared.training = TrainingReport.model_validate_json(training) if training else None
    if compared.training is None:
        compared.notes.append(f"no train.json in {uri}")
    if gate:
        compared.gate = GateReport.model_validate_json(gate)
        compared.verdict = compared.gate.verdict
        compared.criteria = compared.gate.criteria
    return compared


def _read(uri: str, name: str) -> str | None:
    if "://" not in uri:
        path = Path(uri) / name
        return path.read_text() if path.is_file() else None
    try:
        import fsspec
    except ImportError:
        raise RunNotFoundError(
            f"{uri}: reading an object store needs fsspec and its driver "
            "(pip install 'dpo-operator[trainer]')"
        ) from None
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        text: str = fs.cat_file(f"{path.rstrip('/')}/{name}").decode()
    except FileNotFoundError:
        return None
    return text


# -- the comparison (pure) ---------------------------------------------------------------------


def settings_of(config: TrainerConfig) -> dict[str, Any]:
    """A trainer config as the flat settings the comparison lines up."""
    return flatten(config.model_dump(by_alias=True, mode="json"))


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"training.beta": 0.1, ...} from nested settings."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat |= flatten(inner, f"{prefix}{key}.")
        return flat
    return {prefix.rstrip("."): value}


def differing_settings(runs: Sequence[ComparedRun]) -> dict[str, list[Any]]:
    known = [run for run in runs if run.settings]
    names = sorted({name for run in known for name in run.settings})
    differ: dict[str, list[Any]] = {}
    for name in names:
        if name.startswith(NOT_SETTINGS):
            continue
        values = [run.settings.get(name) for run in runs]
        distinct = {json.dumps(run.settings.get(name), sort_keys=True) for run in known}
        if len(distinct) > 1:
            differ[name] = values
    return differ


def format_comparison(runs: Sequence[ComparedRun]) -> str:
    width = max(12, *(len(run.label) + 2 for run in runs))
    lines = [f"{'':34s}" + "".join(f"{run.label:>{width}s}" for run in runs)]

    def row(name: str, cells: Sequence[str]) -> None:
        lines.append(f"  {name:32s}" + "".join(f"{cell:>{width}s}" for cell in cells))

    def number(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, int | float) else "-"

    lines.append("settings that differ")
    differ = differing_settings(runs)
    for name, values in differ.items():
        row(name, [json.dumps(v) if not isinstance(v, str) else v for v in values])
    if not differ:
        lines.append("  (none)")
    lines.append("final training metrics")
    for title, key in FINAL_METRICS:
        row(title, [number(r.training.metrics.get(key)) if r.training else "-" for r in runs])
    row("step", [str(r.training.step) if r.training else "-" for r in runs])
    lines.append("held-out, at the end of training")
    for title, key in HELD_OUT_METRICS:
        row(title, [number(r.training.eval.get(key)) if r.training else "-" for r in runs])
    lines.append("gate")
    row("verdict", [run.verdict or "-" for run in runs])
    if any(run.phase for run in runs):
        row("phase", [run.phase or "-" for run in runs])
    for run in runs:
        confidence = run.gate.confidence if run.gate else 0.95
        for criterion in run.criteria:
            lines.append(f"  {run.label}: {describe_criterion(criterion, confidence)}")
    lines.append("health")
    for run in runs:
        signals = run.training.health if run.training else []
        said = ", ".join(f"{s.reason} (step {s.step})" for s in signals) or "no signal"
        stopped = run.training.stopped_early if run.training else None
        if stopped is not None:
            said += f"; stopped at step {stopped.step}, kept checkpoint-{stopped.kept_step}"
        lines.append(f"  {run.label}: {said}")
    for run in runs:
        lines.extend(f"  note, {run.label}: {note}" for note in run.notes)
    return "\n".join(lines)


def compare(runs: Sequence[str], plot: Path, get: Kubectl = kubectl) -> tuple[str, Path | None]:
    """The printed comparison of `runs` (a sweep's: its trials), and the PNG written to `plot`
    (None if none was)."""
    loaded: list[ComparedRun] = []
    said: list[str] = []
    for run in runs:
        if run.startswith(SWEEP_PREFIX):
            trials, lines = load_sweep(run, get)
            loaded += trials
            said += lines
        else:
            loaded.append(load_run(run, get))
    histories = [(run.label, run.training.log_history) for run in loaded if run.training]
    text = "\n".join([format_comparison(loaded), *said])
    return text, plot_curves(histories, plot)
