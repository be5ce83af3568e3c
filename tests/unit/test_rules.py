"""Each cross-field rule is written once, in CEL: `dpo validate` evaluates the very expression the
CRD carries, and says what the API server says (tests/cluster/test_api_server.py checks that)."""

from __future__ import annotations

from typing import Any

import pytest
from dpo_operator.api import Rule, RuledModel, describe_errors
from dpo_operator.api.cel import broken_rules
from dpo_operator.api.crd import crd_manifest
from dpo_operator.core.sweep import SweepError, trials
from dpo_operator.core.validate import parse_dpojob
from pydantic import ValidationError

from tests.rule_cases import ACCEPTED, BROKEN, SWEEP_BROKEN


@pytest.mark.parametrize(
    ("document", "field", "message"), [pytest.param(m, f, t, id=c) for c, m, f, t in BROKEN]
)
def test_a_manifest_breaking_a_rule_is_refused_with_the_rules_message(
    document: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        parse_dpojob(document)
    problems = describe_errors(refused.value)
    assert any(p.startswith(f"{field}: ") and message in p for p in problems), problems


@pytest.mark.parametrize("document", [pytest.param(m, id=c) for c, m in ACCEPTED])
def test_a_manifest_just_inside_every_rule_is_accepted(document: dict[str, Any]) -> None:
    parse_dpojob(document)


def all_rules() -> list[str]:
    found: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            found.extend(v["rule"] for v in node.get("x-kubernetes-validations", []))
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(crd_manifest())
    visit(crd_manifest("DPOSweep"))
    return found


def test_the_crd_carries_every_rule_the_models_check_and_no_other() -> None:
    in_models = {rule.rule for model in ruled_models() for rule in model.rules if rule.api_server}
    assert set(all_rules()) == in_models


def test_every_rule_has_a_case_that_breaks_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Transition rules aside: only the API server holds the old object they compare with."""
    broken: set[str] = set()
    check = Rule.check

    def recording(rule: Rule, activation: dict[str, Any]) -> str | None:
        problem = check(rule, activation)
        if problem is not None:
            broken.add(rule.rule)
        return problem

    monkeypatch.setattr(Rule, "check", recording)
    broken_rules.cache_clear()  # verdicts kept from other tests would hide the rules they broke
    for _, document, _, _ in BROKEN:
        with pytest.raises(ValidationError):
            parse_dpojob(document)
    for _, sweep, _ in SWEEP_BROKEN:
        with pytest.raises((ValidationError, SweepError)):
            trials(sweep)
    checked = {rule.rule for model in ruled_models() for rule in model.rules if not rule.transition}
    assert checked - broken == set()


def ruled_models() -> list[type[RuledModel]]:
    found: list[type[RuledModel]] = []
    stack = list(RuledModel.__subclasses__())
    while stack:
        model = stack.pop()
        found.append(model)
        stack.extend(model.__subclasses__())
    return found
