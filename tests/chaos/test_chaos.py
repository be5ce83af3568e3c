"""Faults on the real control plane, each against a DPOJob run: after each, the same end state
as without the fault, no duplicate child, nothing promoted that did not pass the gate, the
gate verdict and promotion record intact.

Pods are played by the tests (no kubelet here): what a fault does to a pod is written as a
kubelet or scheduler would write it. Faults inside the trainer's own processes (a rank killed
mid-step resuming from its checkpoint, a corrupted adapter refused by digest, two runs promoting
to one target) run real trainer processes in the trainer and distributed tiers.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest

from tests.chaos.conftest import Outcome
from tests.cluster.control_plane import ControlPlane, Kubelet, Operator, wait_for
from tests.cluster.scenario import Scenario, SweepScenario
from tests.reports import (
    GATE_PASSED,
    GATE_REJECTED,
    PROMOTED,
    SWEEP_CHOICE,
    gate_passed_with_margin,
)

PROMOTION_DIGEST = json.loads(PROMOTED)["digest"]
CHILDREN = ["quickstart-eval-1", "quickstart-promote-1", "quickstart-train-1"]


def promoted_cleanly(run: Scenario, outcome: Outcome, jobs: list[str] = CHILDREN) -> None:
    """The end state of a run without faults; counts a wrong or missing record as data lost."""
    status = run.wait_phase("Succeeded", timeout=90)
    right = (
        status.get("evaluation", {}).get("verdict") == "Passed"
        and status.get("promotion", {}).get("digest") == PROMOTION_DIGEST
    )
    outcome.lost += 0 if right else 1
    assert right, status
    assert run.jobs() == jobs, "no duplicate child, none missing"


def finish(run: Scenario, kubelet: Kubelet, attempt: int = 1) -> None:
    kubelet.succeeded(run.pod(f"train-{attempt}"))
    kubelet.succeeded(run.pod(f"eval-{attempt}"), GATE_PASSED)
    kubelet.succeeded(run.pod(f"promote-{attempt}"), PROMOTED)


def test_the_operator_killed_at_every_phase_boundary(
    chaos_plane: ControlPlane, kubelet: Kubelet, operator: Operator, outcome: Outcome
) -> None:
    run = Scenario(chaos_plane, kubelet, "chaos-kill")

    def kill() -> None:
        operator.kill()
        operator.start()
        outcome.injected += 1

    run.wait_phase("Pending")
    kill()
    kubelet.running(run.pod("train-1"))
    run.wait_phase("Training")
    kill()
    kubelet.succeeded(run.pod("train-1"))
    run.wait_phase("Evaluating")
    kill()
    kubelet.succeeded(run.pod("eval-1"), GATE_PASSED)
    run.wait_phase("Promoting")
    kill()
    kubelet.succeeded(run.pod("promote-1"), PROMOTED)
    promoted_cleanly(run, outcome)
    assert run.status()["restarts"] == 0
    outcome.survived = True


def test_the_operator_killed_at_every_step_of_a_sweep(
    chaos_plane: ControlPlane, kubelet: Kubelet, operator: Operator, outcome: Outcome
) -> None:
    """No trial lost or made twice, the chooser run once, the winner alone promoted."""
    sweep = SweepScenario(chaos_plane, kubelet, "chaos-sweep")

    def kill() -> None:
        operator.kill()
        operator.start()
        outcome.injected += 1

    first = wait_for("two trials", lambda: len(t := sweep.trials()) == 2 and t)
    kill()
    sweep.gate(1, gate_passed_with_margin(0.02))
    kill()
    trials = wait_for("the third trial", lambda: len(t := sweep.trials()) == 3 and t)
    assert {name: trials[name] for name in first} == first
    sweep.gate(2, GATE_REJECTED)
    sweep.gate(3, gate_passed_with_margin(0.3))
    sweep.wait_phase("Choosing")
    kill()
    kubelet.succeeded(sweep.pod("choose"), SWEEP_CHOICE)
    sweep.wait_trial_phase(3, "Promoting")
    kill()
    kubelet.succeeded(sweep.pod("3-promote-1"), PROMOTED)
    status = sweep.wait_phase("Succeeded", timeout=90)
    outcome.lost += 0 if status["winner"] == 3 else 1
    assert status["winner"] == 3
    assert sweep.trials() == trials, "the same three trials, each created once"
    assert sweep.jobs() == [
        "sweep-1-eval-1",
        "sweep-1-train-1",
        "sweep-2-eval-1",
        "sweep-2-train-1",
        "sweep-3-eval-1",
        "sweep-3-promote-1",
        "sweep-3-train-1",
        "sweep-choose",
    ]
    assert sweep.trial_phase(1) == "AwaitingApproval", "never approved: not the winner"
    outcome.survived = True


def test_the_api_server_restarted_mid_run(
    chaos_plane: ControlPlane, kubelet: Kubelet, operator: Operator, outcome: Outcome
) -> None:
    run = Scenario(chaos_plane, kubelet, "chaos-apiserver")
    kubelet.running(run.pod("train-1"))
    run.wait_phase("Training")
    chaos_plane.restart("kube-apiserver")
    outcome.injected += 1
    kubelet.succeeded(run.pod("train-1"))
    run.wait_phase("Evaluating", timeout=120)  # kopf's watches reconnect on their own
    chaos_plane.restart("kube-apiserver")
    outcome.injected += 1
    kubelet.succeeded(run.pod("eval-1"), GATE_PASSED)
    kubelet.succeeded(run.pod("promote-1"), PROMOTED)
    promoted_cleanly(run, outcome)
    assert operator.process is not None
    assert operator.process.poll() is None, "the operator rode it out"
    outcome.survived = True


def test_a_storm_of_conflicting_writes(
    chaos_plane: ControlPlane, kubelet: Kubelet, operator: Operator, outcome: Outcome
) -> None:
    """Someone else writes the DPOJob all the time: every status patch the operator decided on
    an older version is refused (409), and it decides again from the newer one."""
    run = Scenario(chaos_plane, kubelet, "chaos-conflicts")
    custom = chaos_plane.custom()
    stop = threading.Event()

    def storm() -> None:
        while not stop.is_set():
            patch = {"metadata": {"labels": {"storm": str(outcome.injected)}}}
            custom.patch_namespaced_custom_object(
                "dpo.dev", "v1alpha1", "chaos-conflicts", "dpojobs", "quickstart", patch
            )
            outcome.injected += 1
            stop.wait(0.05)

    writer = threading.Thread(target=storm, daemon=True)
    writer.start()
    try:
        finish(run, kubelet)
        promoted_cleanly(run, outcome)
    finally:
        stop.set()
        writer.join()
    outcome.survived = True


@pytest.mark.parametrize(
    ("fault", "restarts"),
    [
        # OOM-killed, or SIGKILLed by someone: the run's own failure, counted.
        pytest.param(lambda k, p: k.terminated(p, 137), 1, id="a training pod killed mid run"),
        # Not the run's fault: a restart all the same, not counted.
        pytest.param(lambda k, p: k.node_lost(p), 0, id="a node lost mid run"),
    ],
)
def test_a_training_pod_lost_mid_run_restarts_the_group(
    chaos_plane: ControlPlane,
    kubelet: Kubelet,
    operator: Operator,
    outcome: Outcome,
    fault: Callable[[Kubelet, Any], None],
    restarts: int,
) -> None:
    run = Scenario(chaos_plane, kubelet, f"chaos-pod-lost-{restarts}")
    kubelet.running(run.pod("train-1"))
    run.wait_phase("Training")
    fault(kubelet, run.pod("train-1"))
    outcome.injected += 1
    wait_for("attempt 2", lambda: run.status().get("attempt") == 2)
    finish(run, kubelet, attempt=2)
    promoted_cleanly(
        run, outcome, ["quickstart-eval-2", "quickstart-promote-2", "quickstart-train-2"]
    )
    assert run.status()["restarts"] == restarts
    outcome.survived = True


def _stalled(run: Scenario) -> dict[str, Any] | None:
    conditions = run.status().get("conditions") or []
    return next((c for c in conditions if c["type"] == "Stalled" and c["status"] == "True"), None)


def test_an_image_that_never_pulls_fails_the_run_at_the_startup_timeout(
    chaos_plane: ControlPlane, kubelet: Kubelet, operator: Operator, outcome: Outcome
) -> None:
    run = Scenario(chaos_plane, kubelet, "chaos-image", **{"runPolicy.startupTimeoutSeconds": 30})
    message = 'Back-off pulling image "ghcr.io/acme/trainer:typo"'
    kubelet.waiting(run.pod("train-1"), "ImagePullBackOff", message)
    outcome.injected += 1
    stalled = wait_for("Stalled", lambda: _stalled(run))
    assert stalled["reason"] == "ImagePullBackOff"
    assert message in stalled["message"]
    assert "Stalled" in run.events()
    status = run.wait_phase("Failed", timeout=60)
    assert "StartupTimeout" in [c["reason"] for c in status["conditions"]]
    assert message in status["message"]
    assert all("-train-" in job for job in run.jobs()), "no gate run, nothing promoted"
    outcome.survived = True


def test_a_missing_secret_stalls_the_run_until_it_exists(
    chaos_plane: ControlPlane, kubelet: Kubelet, operator: Operator, outcome: Outcome
) -> None:
    run = Scenario(chaos_plane, kubelet, "chaos-secret")
    message = 'secret "hf-token" not found'
    kubelet.waiting(run.pod("train-1"), "CreateContainerConfigError", message)
    outcome.injected += 1
    stalled = wait_for("Stalled", lambda: _stalled(run))
    assert message in stalled["message"]
    kubelet.running(run.pod("train-1"))  # the Secret was created: the kubelet starts it
    run.wait_phase("Training")
    assert _stalled(run) is None
    kubelet.succeeded(run.pod("train-1"))
    kubelet.succeeded(run.pod("eval-1"), GATE_PASSED)
    kubelet.succeeded(run.pod("promote-1"), PROMOTED)
    promoted_cleanly(run, outcome)
    outcome.survived = True


def test_a_missing_pvc_is_named_and_fails_the_run_at_the_startup_timeout(
    chaos_plane: ControlPlane, kubelet: Kubelet, operator: Operator, outcome: Outcome
) -> None:
    run = Scenario(chaos_plane, kubelet, "chaos-pvc", **{"runPolicy.startupTimeoutSeconds": 30})
    message = 'persistentvolumeclaim "dpo-runs" not found'
    kubelet.unschedulable(run.pod("train-1"), message)
    outcome.injected += 1
    stalled = wait_for("Stalled", lambda: _stalled(run))
    assert stalled["reason"] == "Unschedulable"
    status = run.wait_phase("Failed", timeout=60)
    assert message in status["message"]
    outcome.survived = True
