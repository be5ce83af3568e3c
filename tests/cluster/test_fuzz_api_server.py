"""Property, on the real API server: a hostile manifest never makes the CRD's CEL rules fail to
evaluate (a rule that errors instead of answering), and what `dpo validate` accepts the API
server accepts too."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from dpo_operator.core.validate import parse_dpojob
from hypothesis import HealthCheck, assume, given, settings
from pydantic import ValidationError

from tests.cluster.control_plane import ControlPlane
from tests.fuzz import hostile_manifests

# What the API server says when a CEL rule itself broke, rather than refused the object.
RULE_BROKE = (
    "evaluating rule",
    "no such key",
    "compilation failed",
    "Internal error",
    "InternalError",
)


# A namespace no other test writes to: a dry-run create of a name another test left behind
# would be refused as AlreadyExists, which is not what this property is about.
FUZZ_NAMESPACE = "fuzz"


@pytest.fixture(scope="module")
def fuzz_namespace(crd_installed: ControlPlane) -> ControlPlane:
    crd_installed.kubectl("create", "namespace", FUZZ_NAMESPACE)
    return crd_installed


@settings(
    max_examples=60,
    deadline=None,
    # The same examples on every run: CI answers for the code, not for the draw.
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(manifest=hostile_manifests())
def test_the_api_servers_rules_answer_every_hostile_manifest(
    fuzz_namespace: ControlPlane, manifest: dict[str, Any]
) -> None:
    assume(not _has_non_finite(manifest))  # JSON, what the API server reads, has no NaN
    metadata = manifest.setdefault("metadata", {})
    if isinstance(metadata, dict):
        metadata["namespace"] = FUZZ_NAMESPACE
    result = fuzz_namespace.kubectl(
        "create", "--dry-run=server", "-f", "-", stdin=json.dumps(manifest), check=False
    )
    said = result.stdout + result.stderr
    assert not any(sign in said for sign in RULE_BROKE), said
    try:
        parse_dpojob(manifest)
    except ValidationError:
        return
    assert result.returncode == 0, f"dpo validate accepts what the API server refuses: {said}"


def _has_non_finite(node: Any) -> bool:
    if isinstance(node, float):
        return not math.isfinite(node)
    if isinstance(node, dict):
        return any(_has_non_finite(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_non_finite(v) for v in node)
    return False
