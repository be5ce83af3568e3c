"""Property: whatever a manifest holds, `dpo validate` and the operator's parsing refuse it with
one line per problem naming its field, or accept it as a DPOJob that renders; nothing crashes."""

from __future__ import annotations

import json
import math
from typing import Any

from dpo_operator.api import describe_errors
from dpo_operator.core.policy import refusals
from dpo_operator.core.render import render_all
from dpo_operator.core.resolve import resolve
from dpo_operator.core.settings import Settings
from dpo_operator.core.validate import parse_dpojob
from hypothesis import HealthCheck, given, settings
from pydantic import ValidationError

from tests.conftest import minimal_manifest, set_fields
from tests.fuzz import PROBLEM_LINE, hostile_manifests


# The same examples on every run: CI answers for the code, not for the draw.
@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(hostile_manifests())
def test_every_hostile_manifest_is_refused_naming_its_field_or_renders(
    manifest: dict[str, Any],
) -> None:
    try:
        job = parse_dpojob(manifest)
    except ValidationError as error:
        problems = describe_errors(error)
        assert problems
        for line in problems:
            assert PROBLEM_LINE.match(line), line
        return
    # Accepted: it must render to objects the API server can carry (JSON without NaN).
    refusals(job, Settings())
    for child in render_all(resolve(job), 1):
        json.dumps(child, allow_nan=False)
    for number in _numbers(job.spec.model_dump()):
        assert math.isfinite(number), "NaN or infinity accepted in the spec"


def _numbers(node: Any) -> list[float]:
    if isinstance(node, dict):
        return [n for value in node.values() for n in _numbers(value)]
    if isinstance(node, list):
        return [n for value in node for n in _numbers(value)]
    return [float(node)] if isinstance(node, int | float) and not isinstance(node, bool) else []


def test_nan_and_infinity_are_refused_where_bounds_cannot_catch_them() -> None:
    manifest = set_fields(
        minimal_manifest(),
        **{"evalGate.minRewardMargin": float("nan"), "dpo.simpoGamma": float("inf")},
    )
    try:
        parse_dpojob(manifest)
    except ValidationError as error:
        problems = describe_errors(error)
    else:
        raise AssertionError("accepted NaN and infinity")
    assert "spec.evalGate.minRewardMargin: must be a finite number, got nan" in problems
    assert "spec.dpo.simpoGamma: must be a finite number, got inf" in problems
