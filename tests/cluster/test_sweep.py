"""A DPOSweep on the real control plane, driven by the operator in its own process: trials
created at most maxParallel at a time and owned by the sweep, the trials table in status and
`kubectl get`/`describe`, the chooser pod's winner alone approved and promoted, and the
trials gone with the sweep."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from dpo_contract.reports import GateCriterion, GateVerdict
from dpo_contract.sweep import SweepChoice, TrialComparison
from dpo_contract.termination import termination_message_json

from tests.cluster.control_plane import ControlPlane, Kubelet, Operator, wait_for
from tests.cluster.scenario import SweepScenario
from tests.reports import ACCURACY, GATE_REJECTED, PROMOTED

# Trial 3 beats trial 1 clearly, pair against pair (what the chooser pod would say).
CHOICE = termination_message_json(
    SweepChoice(
        winner=3,
        confidence=0.95,
        compared=[
            TrialComparison(number=1, mean=0.8, difference=0.4, low=0.3, high=0.5),
            TrialComparison(number=3, mean=1.2),
        ],
    )
)


def passed(margin: float) -> str:
    """A gate that passed, with the held-out reward margin it measured."""
    criterion = GateCriterion(name="rewardMargin", value=margin, threshold=0.0, passed=True)
    verdict = GateVerdict(
        status="passed",
        verdict="Passed",
        adapter_digest="sha256:ab",
        criteria=[ACCURACY, criterion],
    )
    return termination_message_json(verdict)


@pytest.fixture(scope="module")
def operator(crd_installed: ControlPlane) -> Iterator[Operator]:
    running = Operator(crd_installed, log="sweep-operator.log").start()
    try:
        yield running
    finally:
        running.kill()


def test_a_sweep_runs_its_trials_two_at_a_time_and_promotes_only_the_chosen_one(
    operator: Operator, crd_installed: ControlPlane, kubelet: Kubelet
) -> None:
    sweep = SweepScenario(crd_installed, kubelet, "sweep-happy")
    first = wait_for("two trials", lambda: len(t := sweep.trials()) == 2 and t)
    assert sorted(first) == ["sweep-1", "sweep-2"], "in order, at most maxParallel"
    status = sweep.wait_phase("Running")
    assert (status["total"], status["running"], status["done"]) == (3, 2, 0)
    table = crd_installed.kubectl("get", "dposweep", "-n", "sweep-happy").stdout
    assert table.split("\n")[0].split() == [
        "NAME", "PHASE", "TRIALS", "DONE", "RUNNING", "BEST", "WINNER", "AGE",
    ]  # fmt: skip

    sweep.gate(1, passed(0.02))
    sweep.wait_trial_phase(1, "AwaitingApproval")
    third = wait_for("the third trial", lambda: len(t := sweep.trials()) == 3 and t)
    assert {k: v for k, v in third.items() if k in first} == first, "none made twice"

    sweep.gate(2, GATE_REJECTED)
    sweep.gate(3, passed(0.3))
    status = sweep.wait_phase("Choosing")
    assert status["done"] == 3
    assert [t["verdict"] for t in status["trials"]] == ["Passed", "Rejected", "Passed"]
    assert status["best"] == "3: 1/beta", "0.3 at beta 0.3 beats 0.02 at beta 0.05"
    assert status["trials"][0]["rewardMargin"] == 0.02

    kubelet.succeeded(sweep.pod("choose"), CHOICE)
    sweep.wait_trial_phase(3, "Promoting")
    kubelet.succeeded(sweep.pod("3-promote-1"), PROMOTED)
    status = sweep.wait_phase("Succeeded")
    assert status["winner"] == 3
    assert status["message"] == "trial 3 (dpo.beta=0.3) won and is promoted"
    assert [c["number"] for c in status["comparisons"]] == [1, 3]
    assert sweep.trial_phase(1) == "AwaitingApproval", "the others keep their artifacts, unpromoted"
    assert not any(job.startswith(("sweep-1-promote", "sweep-2-promote")) for job in sweep.jobs())
    described = crd_installed.kubectl("describe", "dposweep", "sweep", "-n", "sweep-happy").stdout
    for said in ("TrialCreated", "TrialFinished", "WinnerChosen", "Succeeded", "dpo.beta=0.05"):
        assert said in described

    crd_installed.kubectl("delete", "dposweep", "sweep", "-n", "sweep-happy", "--wait=true")
    wait_for("trials garbage-collected", lambda: sweep.trials() == {} and sweep.jobs() == [])


def test_a_sweep_where_no_gate_passed_fails_and_approves_nothing(
    operator: Operator, crd_installed: ControlPlane, kubelet: Kubelet
) -> None:
    sweep = SweepScenario(crd_installed, kubelet, "sweep-none", betas=(0.1, 0.2))
    sweep.gate(1, GATE_REJECTED)
    sweep.gate(2, GATE_REJECTED)
    status = sweep.wait_phase("Failed")
    assert status["message"] == "no trial passed its gate; nothing is promoted"
    assert "choose" not in " ".join(sweep.jobs())
