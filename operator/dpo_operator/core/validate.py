"""Validation of a DPOJob: the API's rules (pydantic and CEL, on the models), the memory
plan (arithmetic CEL cannot do) and the network profile's needs (a table CEL cannot read).
What the installation allows is `policy.refusals`.

The plan reads the API's models, so the API cannot import it: it is handed to the spec's
validator through the validation context, and every problem is still reported at once, each
under its field."""

from __future__ import annotations

from typing import Any

from dpo_operator.api import (
    DEFAULT_OUTPUT,
    MEMORY_CHECK,
    WITHOUT_RULES,
    DPOJob,
    DPOJobSpec,
    OutputSpec,
)
from dpo_operator.core.network import fabric_problems
from dpo_operator.core.plan import plan


def memory_problems(spec: DPOJobSpec) -> list[str]:
    """What CEL cannot check: the memory plan, and what the network profile needs that the
    spec or its instance type must give."""
    return plan(spec).problems + fabric_problems(spec.network, spec.scheduling.node_selector)


def parse_dpojob(
    manifest: object,
    *,
    check_memory: bool = True,
    check_rules: bool = True,
    default_output: OutputSpec | None = None,
) -> DPOJob:
    """Validate a manifest (a dict from YAML/JSON or the API server) into a DPOJob.

    `check_memory=False` skips the memory plan (`dpo plan` shows a job that fits nowhere);
    `check_rules=False` skips the rules and the plan, for a spec already found valid (the
    operator checks each generation once). `default_output` is the installation's output for a
    DPOJob that names none; the output a run started with (`status.output`) comes before it.
    """
    context: dict[str, Any] = {WITHOUT_RULES: not check_rules}
    started_with = _recorded_output(manifest)
    output = started_with or default_output
    if output is not None:
        context[DEFAULT_OUTPUT] = output
    if check_memory:
        context[MEMORY_CHECK] = memory_problems
    return DPOJob.model_validate(manifest, context=context)


def _recorded_output(manifest: object) -> OutputSpec | None:
    """The output the run recorded when it started: a changed installation default must not
    move a run's checkpoints."""
    if not isinstance(manifest, dict):
        return None
    recorded = (manifest.get("status") or {}).get("output")
    return OutputSpec.model_validate(recorded) if isinstance(recorded, dict) else None
