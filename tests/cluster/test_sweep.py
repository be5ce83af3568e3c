"""A DPOSweep on the real control plane, driven by the operator in its own process: trials
created at most maxParallel at a time and owned by the sweep, the trials table in status and
`kubectl get`/`describe`, the chooser pod's winner alone approved and promoted, and the
trials gone with the sweep."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tests.cluster.control_plane import ControlPlane, Kubelet, Operator, free_port, wait_for
from tests.cluster.scenario import SweepScenario
from tests.reports import GATE_REJECTED, PROMOTED, SWEEP_CHOICE, gate_passed_with_margin


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
        "NAME", "PHASE", "TRIALS", "DONE", "RUNNING", "STOPPED", "BEST", "WINNER", "AGE",
    ]  # fmt: skip

    sweep.gate(1, gate_passed_with_margin(0.02))
    sweep.wait_trial_phase(1, "AwaitingApproval")
    third = wait_for("the third trial", lambda: len(t := sweep.trials()) == 3 and t)
    assert {k: v for k, v in third.items() if k in first} == first, "none made twice"

    sweep.gate(2, GATE_REJECTED)
    sweep.gate(3, gate_passed_with_margin(0.3))
    status = sweep.wait_phase("Choosing")
    assert status["done"] == 3
    assert [t["verdict"] for t in status["trials"]] == ["Passed", "Rejected", "Passed"]
    assert status["best"] == "3: 1/beta", "0.3 at beta 0.3 beats 0.02 at beta 0.05"
    assert status["trials"][0]["rewardMargin"] == 0.02

    kubelet.succeeded(sweep.pod("choose"), SWEEP_CHOICE)
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


def test_a_trial_clearly_worse_at_an_evaluation_is_stopped_and_the_next_one_starts(
    operator: Operator, crd_installed: ControlPlane, kubelet: Kubelet
) -> None:
    port = free_port()
    sweep = SweepScenario(
        crd_installed,
        kubelet,
        "sweep-stop",
        betas=(0.1, 0.2, 0.3),
        **{"monitoring.port": port, "monitoring.intervalSeconds": 5},
    )
    # Rank 0 of each trial, as the trainer serves it: the latest evaluation's held-out margin
    # and its interval. Per beta, trial 1 is in [0.8, 1.2] and trial 2 in [0.05, 0.1].
    registry = CollectorRegistry()
    gauges = {
        name: Gauge(name, name, ("dpojob", "namespace"), registry=registry)
        for name in (
            "dpo_train_step",
            "dpo_eval_step",
            "dpo_eval_reward_margin",
            "dpo_eval_reward_margin_low",
            "dpo_eval_reward_margin_high",
        )
    }
    evaluations = {"sweep-1": (0.08, 0.12), "sweep-2": (0.01, 0.02)}
    for trial, (low, high) in evaluations.items():
        labels = {"dpojob": trial, "namespace": "sweep-stop"}
        gauges["dpo_train_step"].labels(**labels).set(20)
        gauges["dpo_eval_step"].labels(**labels).set(20)
        gauges["dpo_eval_reward_margin"].labels(**labels).set((low + high) / 2)
        gauges["dpo_eval_reward_margin_low"].labels(**labels).set(low)
        gauges["dpo_eval_reward_margin_high"].labels(**labels).set(high)
    server, thread = start_http_server(port, registry=registry)
    try:
        kubelet.running(sweep.pod("1-train-1"))
        kubelet.running(sweep.pod("2-train-1"))
        status = wait_for(
            "a trial stopped", lambda: (s := sweep.status()).get("stopped") == 1 and s, timeout=60
        )
    finally:
        server.shutdown()
        thread.join()
    stopped = status["trials"][1]
    assert stopped["stopped"] == (
        "held-out margin per beta at step 20 at most 0.1 (upper bound at 95%), below trial 1's "
        "lower bound 0.8 at the same step: it cannot win"
    )
    assert (stopped["rewardMarginLow"], stopped["rewardMarginHigh"]) == (0.01, 0.02)
    sweep.wait_trial_phase(2, "Stopped")
    wait_for("its Job deleted: its GPUs go back", lambda: "sweep-2-train-1" not in sweep.jobs())
    assert "sweep-3" in wait_for("the next trial", lambda: len(t := sweep.trials()) == 3 and t)
    assert "Stopped" in wait_for(
        "the trial's own event", lambda: "Stopped" in (e := sweep.events("DPOJob")) and e
    )
    assert "TrialStopped" in sweep.events()
    row = crd_installed.kubectl("get", "dposweep", "-n", "sweep-stop").stdout.splitlines()[1]
    assert row.split()[1:6] == ["Running", "3", "1", "2", "1"], row
