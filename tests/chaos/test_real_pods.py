"""Faults inside the trainer's own processes, on a control plane whose pods really run:
kube-scheduler places them on a Node that a `PodRunner` serves, and the trainer trains, gates
and promotes in them, its files on a PersistentVolume. After each fault: the same end state as
without it, nothing promoted that did not pass, no artifact lost.
"""

from __future__ import annotations

import json
from typing import Any

from dpo_contract.manifest import verify_manifest
from dpo_trainer.io.artifacts import ADAPTER, CHECKPOINTS, TRAIN_REPORT
from dpo_trainer.io.checkpoints import COMPLETE_MARKER
from dpo_trainer.publish.pointer import CURRENT, VERSIONS

from tests.chaos.conftest import Outcome
from tests.cluster.control_plane import ControlPlane, Operator, wait_for
from tests.cluster.pod_plane import TRAINING_TIMEOUT, Run, assert_promoted_intact
from tests.cluster.pod_runner import PodRunner


def test_a_training_pod_killed_mid_step_resumes_from_its_checkpoint(
    pod_plane: ControlPlane, pod_runner: PodRunner, pod_operator: Operator, outcome: Outcome
) -> None:
    run = Run(pod_plane, pod_runner, "real-kill", "quickstart")
    first = run.pod("train")
    checkpoint = run.artifacts / CHECKPOINTS / "checkpoint-20" / COMPLETE_MARKER
    wait_for("checkpoint-20", checkpoint.exists, TRAINING_TIMEOUT)
    pod_runner.kill(run.namespace, first)  # SIGKILL to every process of the pod, mid-step
    outcome.injected += 1

    second = run.pod("train", attempt=2)
    status = run.wait_phase("Succeeded")
    log = pod_runner.log(run.namespace, second)
    assert "resuming from" in log, log[-3000:]
    resumed_steps = [
        int(line.split()[1].split("/")[0]) for line in log.splitlines() if line.startswith("step ")
    ]
    assert resumed_steps, log[-3000:]
    assert resumed_steps[0] > 20, "the second attempt went on, not from step 0"
    report = json.loads((run.artifacts / TRAIN_REPORT).read_text())
    logged = [e["step"] for e in report["logHistory"] if "loss" in e]
    assert logged == sorted(set(logged)), "one unbroken loss curve, no step logged twice"
    assert logged[-1] == 60
    assert status["restarts"] == 1
    promoted_intact(run, status, outcome)
    outcome.survived = True


def test_a_corrupted_adapter_is_refused_by_digest(
    pod_plane: ControlPlane, pod_runner: PodRunner, pod_operator: Operator, outcome: Outcome
) -> None:
    with pod_runner.holding("eval"):
        run = Run(pod_plane, pod_runner, "real-corrupt", "quickstart", **{"dpo.maxSteps": 20})
        run.wait_phase("Evaluating")
        weights = run.artifacts / ADAPTER / "adapter_model.safetensors"
        damaged = bytearray(weights.read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        weights.write_bytes(bytes(damaged))
        outcome.injected += 1
    status = run.wait_phase("Failed")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert "adapter_model.safetensors" in failed["message"], failed
    assert "digest" in failed["message"] or "sha256" in failed["message"], failed
    assert not (run.volume / "promoted" / "quickstart" / CURRENT).exists(), "nothing promoted"
    outcome.survived = True


def test_two_runs_promoting_to_one_target_leave_one_consistent_pointer(
    pod_plane: ControlPlane, pod_runner: PodRunner, pod_operator: Operator, outcome: Outcome
) -> None:
    spec = {
        "dpo.maxSteps": 20,
        "evalGate.mustBeatPromoted": True,
        "promotion.target": "pvc://dpo-runs/promoted/shared",
    }
    with pod_runner.holding("promote"):
        runs = [
            # Different seeds: two different adapters, each passing the gate on its own.
            Run(pod_plane, pod_runner, "real-race", "first", **spec),
            Run(pod_plane, pod_runner, "real-race", "second", **spec, **{"dpo.seed": 7}),
        ]
        for run in runs:
            run.wait_phase("Promoting")
        outcome.injected += 1
    ends = [wait_for("an end", lambda r=run: _ended(r), TRAINING_TIMEOUT) for run in runs]
    target = runs[0].volume / "promoted" / "shared"
    current = json.loads((target / CURRENT).read_text())
    winners = [r for r, s in zip(runs, ends, strict=True) if s["phase"] == "Succeeded"]
    losers = [(r, s) for r, s in zip(runs, ends, strict=True) if s["phase"] != "Succeeded"]
    assert len(winners) == 1, ends
    (winner,) = winners
    assert current["job"]["name"] == winner.name
    assert verify_manifest(target / VERSIONS / current["version"]) == current["digest"]
    for _, status in losers:
        failed = next(c for c in status["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "ChampionChanged", failed
        assert "promoted meanwhile by another run" in failed["message"], failed
    outcome.survived = True


def _ended(run: Run) -> dict[str, Any] | None:
    status = run.status()
    return status if status.get("phase") in {"Succeeded", "Failed"} else None


def promoted_intact(run: Run, status: dict[str, Any], outcome: Outcome) -> None:
    """`assert_promoted_intact`, counting a wrong or missing record as data lost."""
    try:
        assert_promoted_intact(run, status)
    except AssertionError:
        outcome.lost += 1
        raise
