"""A DPOSweep's trials: the settings each takes (every combination of a grid, or seeded random
draws) and the DPOJob each is, validated as any DPOJob.

Pure: the same sweep always gives the same trials, in the same order, under the same names, so a
restarted controller (or `dpo render`) finds exactly the DPOJobs it would create.

Every trial precomputes its reference log-probs (SimPO has none): the reference is the same
model on the same data and maxLength in every trial, so the reference cache (keyed by content,
`<output>/<namespace>/reference-logps`) computes them once and every later trial reuses them.
Every trial carries the template's promotion in manual mode: it stops at AwaitingApproval once
its gate passed, and the sweep approves its winner alone.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from dpo_operator.api import (
    API_VERSION,
    DEFAULT_OUTPUT,
    KIND,
    DPOJob,
    OutputSpec,
    describe_errors,
)
from dpo_operator.api.sweep import MAX_TRIALS, SWEEP_KIND, SWEEPABLE, DPOSweep, SweepParameter
from dpo_operator.core.names import controller_reference
from dpo_operator.core.validate import parse_dpojob

SWEEP_LABEL = "dpo.dev/sweep"
TRIAL_LABEL = "dpo.dev/trial"
TRIAL_SETTINGS_ANNOTATION = "dpo.dev/trial-settings"
Settings = dict[str, Any]


@dataclass(frozen=True)
class Trial:
    number: int  # from 1
    settings: Settings  # field (as SWEEPABLE names it) -> value
    manifest: dict[str, Any]  # the DPOJob as the sweep creates it
    job: DPOJob  # the same, validated

    def describe(self) -> str:
        return ", ".join(f"{field}={value}" for field, value in self.settings.items())


class SweepError(ValueError):
    """Trials that cannot run: one line per problem, each naming the trial and the field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def trial_name(sweep: str, number: int) -> str:
    return f"{sweep}-{number}"


def trial_settings(sweep: DPOSweep) -> list[Settings]:
    """The settings of every trial, in order."""
    spec = sweep.spec
    if spec.search.kind == "grid":
        axes = [[(p.field, value) for value in p.choices or []] for p in spec.parameters]
        return [dict(combination) for combination in itertools.product(*axes)]
    draws = random.Random(spec.search.seed)
    return [
        {p.field: _draw(p, draws) for p in spec.parameters} for _ in range(spec.search.trials or 0)
    ]


def _draw(parameter: SweepParameter, draws: random.Random) -> Any:
    if parameter.choices is not None:
        return draws.choice(parameter.choices)
    low, high = float(parameter.min or 0), float(parameter.max or 0)
    if SWEEPABLE[parameter.field] == "integer":
        return draws.randint(math.ceil(low), math.floor(high))
    if parameter.scale == "log":
        value = math.exp(draws.uniform(math.log(low), math.log(high)))
    else:
        value = draws.uniform(low, high)
    return float(f"{value:.3g}")  # a setting a person can read and type again


def trials(
    sweep_manifest: dict[str, Any],
    default_output: OutputSpec | None = None,
    *,
    check_memory: bool = True,
) -> list[Trial]:
    """Every trial of the sweep `sweep_manifest` (a DPOSweep document) as a validated DPOJob
    (`check_memory`: its memory plan too); raises SweepError naming every trial and field at
    fault, or ValidationError for the sweep itself."""
    # The template alone is not planned: each trial is, with its own settings.
    context = {DEFAULT_OUTPUT: default_output} if default_output else {}
    sweep = DPOSweep.model_validate(sweep_manifest, context=context)
    chosen = trial_settings(sweep)
    if len(chosen) > MAX_TRIALS:
        sizes = " x ".join(str(len(p.choices or [])) for p in sweep.spec.parameters)
        raise SweepError(
            [
                f"spec.parameters: the grid has {len(chosen)} combinations ({sizes}), more than "
                f"{MAX_TRIALS}; use fewer values, or search: {{kind: random, trials: N}}"
            ]
        )
    template = sweep_manifest["spec"]["template"]
    found: list[Trial] = []
    problems: list[str] = []
    for number, settings in enumerate(chosen, start=1):
        manifest = trial_manifest(sweep, template, number, settings)
        try:
            job = parse_dpojob(manifest, check_memory=check_memory, default_output=default_output)
        except ValidationError as error:
            described = ", ".join(f"{field}={value}" for field, value in settings.items())
            problems += [f"trial {number} ({described}): {line}" for line in describe_errors(error)]
            continue
        found.append(Trial(number, settings, manifest, job))
    if problems:
        raise SweepError(problems)
    return found


def trial_manifest(
    sweep: DPOSweep, template: dict[str, Any], number: int, settings: Settings
) -> dict[str, Any]:
    """The DPOJob of trial `number`: the template with the trial's settings, sharing the
    reference pass, its promotion waiting for the sweep's approval (given to the winner)."""
    spec = copy.deepcopy(template)
    for field, value in settings.items():
        group, name = field.split(".")
        spec.setdefault(group, {})[name] = value
    loss = spec.get("dpo", {}).get("lossType", ["sigmoid"])
    if "simpo" not in ([loss] if isinstance(loss, str) else loss):
        spec.setdefault("dpo", {})["precomputeRefLogProbs"] = True
    if spec.get("promotion") is not None:
        spec["promotion"] = {**spec["promotion"], "mode": "manual"}
    metadata: dict[str, Any] = {
        "name": trial_name(sweep.name, number),
        "namespace": sweep.namespace,
        "labels": {SWEEP_LABEL: sweep.name, TRIAL_LABEL: str(number)},
        "annotations": {TRIAL_SETTINGS_ANNOTATION: json.dumps(settings, sort_keys=True)},
    }
    if sweep.metadata.uid:
        metadata["ownerReferences"] = [
            controller_reference(SWEEP_KIND, sweep.name, sweep.metadata.uid)
        ]
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}
