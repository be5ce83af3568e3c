"""The DPOSweep: a DPOJob template and a search space over its DPO and LoRA settings; each trial
is a DPOJob the sweep owns.

Only settings that leave the reference model's log-probs unchanged are swept (never the model,
the data, the tokenizer or maxLength), so every trial can share one reference pass.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from dpo_contract.fields import LOSS_TYPES, ContractModel, LossType
from dpo_contract.sweep import TrialComparison
from pydantic import Field, StrictFloat, StrictInt, model_validator

from dpo_operator.api.cel import Rule, RuledModel
from dpo_operator.api.job import DPOJobSpec
from dpo_operator.api.meta import ObjectMeta
from dpo_operator.api.status import Phase

SWEEP_KIND = "DPOSweep"
SWEEP_PLURAL = "dposweeps"
# Trials are named <sweep>-<n> and a DPOJob's name is at most 49 characters.
MAX_SWEEP_NAME_LENGTH = 45
MAX_TRIALS = 64

# The fields a sweep may vary, under the DPOJob spec, and the kind of value each takes.
SWEEPABLE: dict[str, Literal["number", "integer", "loss"]] = {
    "dpo.beta": "number",
    "dpo.learningRate": "number",
    "dpo.simpoGamma": "number",
    "dpo.epochs": "number",
    "dpo.maxSteps": "integer",
    "dpo.seed": "integer",
    "dpo.lossType": "loss",
    "peft.r": "integer",
    "peft.alpha": "integer",
    "peft.dropout": "number",
}


class SweepParameter(RuledModel):
    """One axis of the search space: values (a grid axis, or the choices a random draw picks
    from), loss names for dpo.lossType, or a numeric range for random draws."""

    rules = (
        Rule(
            "(has(self.values) ? 1 : 0) + (has(self.lossTypes) ? 1 : 0) + "
            "(has(self.min) || has(self.max) ? 1 : 0) == 1",
            "give one of values (a list), lossTypes (names, for dpo.lossType) or min and max "
            "(a range for random draws)",
        ),
        Rule(
            "(self.field == 'dpo.lossType') == has(self.lossTypes)",
            "dpo.lossType takes lossTypes (loss names); every other field values or a range",
            ".field",
        ),
        Rule(
            "has(self.min) == has(self.max)",
            "a range needs both min and max",
            ".max",
        ),
        Rule(
            "!has(self.min) || !has(self.max) || self.min < self.max",
            "min must be below max",
            ".max",
        ),
        Rule(
            "!has(self.scale) || self.scale != 'log' || !has(self.min) || self.min > 0.0",
            "a log scale needs min > 0",
            ".scale",
        ),
    )

    field: Literal[tuple(SWEEPABLE)] = Field(  # type: ignore[valid-type]
        description="The DPOJob spec field varied, e.g. dpo.beta, dpo.learningRate, peft.r."
    )
    values: list[float] | None = Field(
        default=None, min_length=1, max_length=MAX_TRIALS, description="The values it takes."
    )
    loss_types: list[LossType] | None = Field(
        default=None,
        min_length=1,
        max_length=len(LOSS_TYPES),
        description="dpo.lossType: the losses it takes, e.g. [sigmoid, ipo, sigmoid_norm].",
    )
    min: float | None = Field(default=None, description="Random draws: the lowest value.")
    max: float | None = Field(default=None, description="Random draws: the highest value.")
    scale: Literal["linear", "log"] = Field(
        default="linear",
        description="Random draws from min..max: uniform (linear) or log-uniform (log: learning "
        "rates, beta).",
    )

    @model_validator(mode="after")
    def _whole_numbers_for_integer_fields(self) -> SweepParameter:
        if SWEEPABLE[self.field] == "integer":
            fractional = [value for value in self.values or [] if value != int(value)]
            if fractional:
                raise ValueError(f"values: {self.field} takes integers, got {fractional[0]}")
        return self

    @property
    def choices(self) -> list[Any] | None:
        """What a trial may take: the values (whole numbers for an integer field) or losses."""
        if self.loss_types is not None:
            return list(self.loss_types)
        if self.values is None:
            return None
        if SWEEPABLE[self.field] == "integer":
            return [int(value) for value in self.values]
        return list(self.values)


class SweepSearch(RuledModel):
    """How trials are drawn from the space."""

    rules = (
        Rule(
            # has(): the CRD's default ({}) is checked before its own defaults fill it in.
            "!has(self.kind) || self.kind != 'random' || has(self.trials)",
            "random search needs trials: how many draws",
            ".trials",
        ),
        Rule(
            "!has(self.kind) || self.kind != 'grid' || !has(self.trials)",
            "grid search runs every combination; trials is for random search",
            ".trials",
        ),
    )

    kind: Literal["grid", "random"] = Field(
        default="grid", description="grid: every combination of the values; random: draws."
    )
    trials: StrictInt | None = Field(
        default=None, ge=1, le=MAX_TRIALS, description="Random search: how many trials."
    )
    seed: StrictInt = Field(
        default=0, ge=0, le=2**32 - 1, description="Random search: the draws' seed."
    )


class DPOSweepSpec(RuledModel):
    """A DPOJob template and the settings each trial varies."""

    rules = (
        Rule(
            "self.search.kind != 'grid' || "
            "self.parameters.all(p, has(p.values) || has(p.lossTypes))",
            "grid search needs values on every parameter (ranges are for random search)",
            ".parameters",
        ),
        Rule(
            "self.parameters.all(p, self.parameters.exists_one(q, q.field == p.field))",
            "each field may be varied by one parameter only",
            ".parameters",
        ),
    )

    template: DPOJobSpec = Field(
        description="The DPOJob spec every trial starts from (all of a DPOJob's fields and rules)."
    )
    parameters: list[SweepParameter] = Field(
        min_length=1, max_length=8, description="The search space: one entry per field varied."
    )
    search: SweepSearch = Field(default_factory=SweepSearch)
    max_parallel: StrictInt = Field(
        default=2, ge=1, le=MAX_TRIALS, description="Trials running (or queued in Kueue) at once."
    )


SweepPhase = Literal["Running", "Choosing", "Promoting", "Succeeded", "Failed"]


class Rung(ContractModel):
    """A trial's held-out reward margin interval at one evaluation step during training."""

    step: StrictInt
    low: StrictFloat
    high: StrictFloat


MAX_RUNGS = 32


class TrialStatus(ContractModel):
    """One trial as the sweep last saw it."""

    number: StrictInt
    name: Annotated[str, Field(max_length=63)]
    settings: Annotated[str, Field(max_length=1024)] = Field(
        description="What this trial sets, e.g. dpo.beta=0.1, dpo.learningRate=5e-06."
    )
    phase: Phase | None = None
    reward_margin: StrictFloat | None = Field(
        default=None,
        description="The gate's held-out reward margin once scored; the latest training one "
        "before.",
    )
    reward_margin_low: StrictFloat | None = Field(
        default=None, description="The held-out margin's interval: its lower bound."
    )
    reward_margin_high: StrictFloat | None = Field(
        default=None, description="The held-out margin's interval: its upper bound."
    )
    reward_accuracy: StrictFloat | None = Field(
        default=None, description="The same, for reward accuracy."
    )
    verdict: Literal["Passed", "Rejected", "Inconclusive"] | None = None
    stopped: Annotated[str, Field(max_length=1024)] | None = Field(
        default=None, description="Why the sweep stopped it early (the trial is Stopped)."
    )
    rungs: list[Rung] = Field(
        default_factory=list,
        max_length=MAX_RUNGS,
        description="Its held-out margin interval at each evaluation the operator saw: trials "
        "are compared at the same step.",
    )


class DPOSweepStatus(ContractModel):
    phase: SweepPhase | None = None
    message: Annotated[str, Field(max_length=32768)] | None = None
    total: StrictInt = Field(default=0, description="Trials in all.")
    done: StrictInt = Field(default=0, description="Trials finished (gated, rejected, failed).")
    running: StrictInt = Field(default=0, description="Trials created and not finished.")
    stopped: StrictInt = Field(
        default=0, description="Trials stopped early, clearly worse than the best (among done)."
    )
    best: Annotated[str, Field(max_length=256)] | None = Field(
        default=None, description="The trial with the highest held-out margin per beta so far."
    )
    winner: StrictInt | None = Field(
        default=None, description="The trial chosen (and, with a promotion, promoted)."
    )
    trials: list[TrialStatus] = Field(default_factory=list, max_length=MAX_TRIALS)
    comparisons: list[TrialComparison] = Field(
        default_factory=list,
        max_length=MAX_TRIALS,
        description="The winner against every trial whose gate passed, pair by pair.",
    )


class DPOSweep(RuledModel):
    """DPOSweep tries DPO settings as trials that share one reference pass."""

    rules = (
        Rule(
            f"self.metadata.name.size() <= {MAX_SWEEP_NAME_LENGTH}",
            f"metadata.name: must be at most {MAX_SWEEP_NAME_LENGTH} characters: its trials are "
            "DPOJobs named <name>-<n>; rename the DPOSweep",
        ),
    )

    api_version: Literal["dpo.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["DPOSweep"]
    metadata: ObjectMeta
    spec: DPOSweepSpec
    status: DPOSweepStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace


def sweep_document(manifest: Any) -> bool:
    return isinstance(manifest, dict) and manifest.get("kind") == SWEEP_KIND
