"""A DPOSweep's trials: which settings each takes, the DPOJob each is (validated as any), and
every problem of a sweep named at once, each with its trial and field."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
import yaml
from dpo_contract.sweep import choose_winner
from dpo_operator.api import describe_errors
from dpo_operator.api.crd import crd_manifest
from dpo_operator.cli.main import main
from dpo_operator.core.sweep import SweepError, trials
from pydantic import ValidationError

from tests.conftest import REPO, SWEEP_EXAMPLES
from tests.rule_cases import SWEEP_BROKEN

EXAMPLE: dict[str, Any] = yaml.safe_load((REPO / "examples" / "beta-sweep.yaml").read_text())


def sweep(**spec: Any) -> dict[str, Any]:
    manifest = copy.deepcopy(EXAMPLE)
    manifest["spec"].update(spec)
    return manifest


def problems(manifest: dict[str, Any]) -> list[str]:
    with pytest.raises((ValidationError, SweepError)) as refused:
        trials(manifest)
    if isinstance(refused.value, SweepError):
        return refused.value.problems
    return describe_errors(refused.value)


def test_a_grid_is_every_combination_in_order_each_a_dpojob_of_the_sweep() -> None:
    found = trials(EXAMPLE)
    assert [t.job.name for t in found] == [f"beta-sweep-{n}" for n in range(1, 7)]
    assert [(t.settings["dpo.beta"], t.settings["dpo.learningRate"]) for t in found] == [
        (0.05, 1e-4),
        (0.05, 5e-4),
        (0.1, 1e-4),
        (0.1, 5e-4),
        (0.3, 1e-4),
        (0.3, 5e-4),
    ]
    third = found[2]
    assert (third.job.spec.dpo.beta, third.job.spec.learning_rate) == (0.1, 1e-4)
    assert third.job.spec.dpo.precompute_ref_log_probs, "one reference pass for every trial"
    assert third.job.spec.promotion is not None
    assert third.job.spec.promotion.mode == "manual", "only the sweep's winner is approved"
    metadata = third.manifest["metadata"]
    assert metadata["labels"] == {"dpo.dev/sweep": "beta-sweep", "dpo.dev/trial": "3"}
    assert json.loads(metadata["annotations"]["dpo.dev/trial-settings"]) == third.settings
    assert "ownerReferences" not in metadata, "rendered, not yet applied: no uid to own it"
    template = EXAMPLE["spec"]["template"]
    assert third.manifest["spec"]["evalGate"] == template["evalGate"], "the rest as templated"


def test_an_applied_sweep_owns_its_trials() -> None:
    applied = sweep()
    applied["metadata"]["uid"] = "7d2c1a8e-0000-4000-8000-000000000001"
    (owner,) = trials(applied)[0].manifest["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "dpo.dev/v1alpha1",
        "kind": "DPOSweep",
        "name": "beta-sweep",
        "uid": "7d2c1a8e-0000-4000-8000-000000000001",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def test_random_draws_are_the_seeds_and_stay_in_their_ranges() -> None:
    space = [
        {"field": "dpo.learningRate", "min": 1e-6, "max": 1e-4, "scale": "log"},
        {"field": "peft.r", "min": 4, "max": 32},
        {"field": "dpo.lossType", "lossTypes": ["sigmoid", "ipo", "sigmoid_norm"]},
    ]
    drawn = sweep(parameters=space, search={"kind": "random", "trials": 12, "seed": 7})
    first = [t.settings for t in trials(drawn)]
    assert first == [t.settings for t in trials(drawn)], "the same seed, the same trials"
    assert len(first) == 12
    rates = [s["dpo.learningRate"] for s in first]
    assert all(1e-6 <= r <= 1e-4 for r in rates)
    logs = [math.log10(r) for r in rates]
    assert max(logs) - min(logs) > 1, "log-uniform: spread over the decades"
    assert all(isinstance(s["peft.r"], int) and 4 <= s["peft.r"] <= 32 for s in first)
    assert {s["dpo.lossType"] for s in first} <= {"sigmoid", "ipo", "sigmoid_norm"}
    other = sweep(parameters=space, search={"kind": "random", "trials": 12, "seed": 8})
    assert [t.settings for t in trials(other)] != first


@pytest.mark.parametrize(
    ("manifest", "expected"), [pytest.param(m, e, id=c) for c, m, e in SWEEP_BROKEN]
)
def test_a_bad_sweep_is_refused_naming_the_field(manifest: dict[str, Any], expected: str) -> None:
    found = problems(manifest)
    assert any(line.startswith(expected) for line in found), found


def test_every_trial_is_validated_as_a_dpojob_each_problem_naming_its_trial() -> None:
    """SimPO is reference-free: the trials that set it with a reference model are refused, the
    other trials are not."""
    manifest = sweep(parameters=[{"field": "dpo.lossType", "lossTypes": ["sigmoid", "simpo"]}])
    manifest["spec"]["template"]["model"]["reference"] = {"name": "builtin:tiny-llama"}
    assert problems(manifest) == [
        "trial 2 (dpo.lossType=simpo): spec.model.reference: simpo is reference-free; remove "
        "model.reference"
    ]
    simpo_alone = sweep(parameters=[{"field": "dpo.lossType", "lossTypes": ["simpo"]}])
    (only,) = trials(simpo_alone)
    assert not only.job.spec.dpo.precompute_ref_log_probs, "SimPO has no reference to score"


def test_dpo_validate_and_render_take_a_sweep(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(REPO / "examples" / "beta-sweep.yaml")
    assert main(["validate", path]) == 0
    assert capsys.readouterr().out.count("is valid") == 6
    assert main(["render", path]) == 0
    rendered = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in rendered] == ["DPOJob"] * 6, "what the sweep creates: its trials"
    assert [d["metadata"]["name"] for d in rendered] == [f"beta-sweep-{n}" for n in range(1, 7)]


def test_the_winner_is_compared_pair_against_pair_and_a_tie_is_said() -> None:
    """Trial 2 beats trial 1 on every pair by about 0.5 (clearly); trial 3 is trial 2 but for
    noise of either sign (tied within the interval): the winner keeps the higher mean."""
    base = [0.1 * (i % 7) for i in range(200)]
    one = [m - 0.5 for m in base]
    two = list(base)
    three = [m + (0.01 if i % 2 else -0.011) for i, m in enumerate(base)]
    choice = choose_winner({1: one, 2: two, 3: three}, 0.95)
    assert choice.winner == 2
    against = {c.number: c for c in choice.compared}
    assert against[1].difference == pytest.approx(0.5)
    assert against[1].low is not None
    assert against[1].low > 0.4
    assert not against[1].tied
    assert against[3].tied
    assert choice.tied == [3]
    with pytest.raises(ValueError, match="same held-out pairs"):
        choose_winner({1: one, 2: two[:-1]}, 0.95)


def test_the_committed_sweep_crd_is_the_generated_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["crd", "DPOSweep"]) == 0
    generated = capsys.readouterr().out
    assert (REPO / "crds" / "dposweep.yaml").read_text() == generated, "run `make crd`"
    crd = crd_manifest("DPOSweep")
    assert crd["metadata"]["name"] == "dposweeps.dpo.dev"
    assert crd["spec"]["names"]["shortNames"] == ["dposweep"]
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    template = schema["properties"]["spec"]["properties"]["template"]
    rules = " ".join(r["rule"] for r in template["x-kubernetes-validations"])
    assert "self.scheduling.topologyPolicy" in rules, "a trial's rules hold for the template"
    assert SWEEP_EXAMPLES == [REPO / "examples" / "beta-sweep.yaml"]
