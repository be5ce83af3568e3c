"""A run never hangs silently: pods that cannot start are named with the kubelet's or scheduler's
own words in a Stalled condition and an Event, and the run fails at the startup timeout; time
waiting for a person does not count against the deadline."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import kopf
from dpo_operator.api import DPOJob
from dpo_operator.controller.cache import seen_job, seen_pod
from dpo_operator.core.lifecycle import Decision, PodState, decide

from tests.reports import GATE_PASSED, GATE_PASSED_FIRST
from tests.unit.test_lifecycle import NOW, child, job, observed, pod

PULL = PodState(
    "demo-train-1-0-x",
    "Pending",
    waiting_reason="ImagePullBackOff",
    waiting_message='Back-off pulling image "ghcr.io/acme/trainer:typo"',
)


def later(decision: Decision, **spec: Any) -> DPOJob:
    """The DPOJob once the operator wrote `decision`'s status."""
    return job(status=decision.status.model_dump(by_alias=True), **spec)


def test_an_image_that_cannot_be_pulled_is_named_in_a_condition_and_an_event() -> None:
    decision = decide(job(), observed(child("train", 1, "Pending", PULL)))
    stalled = next(c for c in decision.status.conditions if c.type == "Stalled")
    assert stalled.status == "True"
    assert stalled.reason == "ImagePullBackOff"
    assert 'Back-off pulling image "ghcr.io/acme/trainer:typo"' in stalled.message
    assert [e.reason for e in decision.events] == ["Stalled"]
    again = decide(later(decision), observed(child("train", 1, "Pending", PULL)))
    assert again.events == [], "said once, not at every reconcile"


def test_a_stalled_run_fails_at_the_startup_timeout_with_the_pods_own_message() -> None:
    first = decide(job(), observed(child("train", 1, "Pending", PULL)))
    assert first.status.waiting_since == NOW
    limit = job().spec.run_policy.startup_timeout_seconds
    just_in = decide(
        later(first),
        observed(child("train", 1, "Pending", PULL), now=NOW + timedelta(seconds=limit)),
    )
    assert just_in.status.phase == "Pending"
    over = decide(
        later(first),
        observed(child("train", 1, "Pending", PULL), now=NOW + timedelta(seconds=limit + 1)),
    )
    assert over.status.phase == "Failed"
    failed = next(c for c in over.status.conditions if c.type == "Failed")
    assert failed.reason == "StartupTimeout"
    assert "0/1 pod(s) of demo-train-1 started within runPolicy.startupTimeoutSeconds" in (
        over.status.message or ""
    )
    assert "ImagePullBackOff" in (over.status.message or "")


def test_half_a_gang_placed_is_a_stall_too() -> None:
    spec = {"resources": {"nodes": 2, "gpusPerNode": 0}}
    unschedulable = PodState(
        "demo-train-1-1-x",
        "Pending",
        waiting_reason="Unschedulable",
        waiting_message="0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
    )
    running = child("train", 1, "Running", pod("Running"), unschedulable)
    first = decide(job(**spec), observed(running))
    assert first.status.phase == "Training"
    assert any(c.type == "Stalled" and c.reason == "Unschedulable" for c in first.status.conditions)
    limit = job(**spec).spec.run_policy.startup_timeout_seconds
    over = decide(later(first, **spec), observed(running, now=NOW + timedelta(seconds=limit + 1)))
    assert over.status.phase == "Failed"
    assert "1/2 pod(s) of demo-train-1 started" in (over.status.message or "")


def test_a_job_that_creates_no_pod_fails_at_the_timeout_pointing_at_its_events() -> None:
    first = decide(job(), observed(child("train", 1, "Pending")))
    limit = job().spec.run_policy.startup_timeout_seconds
    over = decide(
        later(first),
        observed(child("train", 1, "Pending"), now=NOW + timedelta(seconds=limit + 1)),
    )
    assert over.status.phase == "Failed"
    assert "no pod was created; `kubectl describe job demo-train-1`" in (over.status.message or "")


def test_once_every_pod_started_the_stall_is_cleared() -> None:
    first = decide(job(), observed(child("train", 1, "Pending", PULL)))
    running = decide(later(first), observed(child("train", 1, "Running", pod("Running"))))
    stalled = next(c for c in running.status.conditions if c.type == "Stalled")
    assert stalled.status == "False"


def test_kueue_admission_time_is_not_a_stall() -> None:
    queued = job(scheduling={"queueName": "q"})
    decision = decide(queued, observed(child("train", 1, "Pending", suspended=True)))
    assert decision.status.phase == "Queued"
    assert decision.status.waiting_since is None


def test_the_approval_wait_does_not_count_against_the_deadline() -> None:
    spec = {
        "promotion": {"target": "s3://m", "mode": "manual"},
        "runPolicy": {"activeDeadlineSeconds": 600},
    }
    trained = (
        child("train", 1, "Complete", pod("Succeeded", 0)),
        child(
            "eval",
            1,
            "Complete",
            pod("Succeeded", 0, GATE_PASSED),
        ),
    )
    start = job(status={"phase": "Evaluating", "attempt": 1, "startTime": NOW.isoformat()}, **spec)
    waiting = decide(start, observed(*trained, now=NOW + timedelta(seconds=300)))
    assert waiting.status.phase == "AwaitingApproval"
    a_day_later = NOW + timedelta(days=1)
    still = decide(
        job(status=waiting.status.model_dump(by_alias=True), **spec),
        observed(*trained, now=a_day_later),
    )
    assert still.status.phase == "AwaitingApproval", "a day of waiting for a person is not running"
    approved = decide(
        job(
            status=still.status.model_dump(by_alias=True),
            annotations={"dpo.dev/approve": "sha256:ab"},  # the adapter the gate passed
            **spec,
        ),
        observed(*trained, now=a_day_later),
    )
    assert approved.status.phase == "Promoting"


def test_the_job_controllers_early_verdicts_are_read_as_the_outcome() -> None:
    def seen(condition: str) -> str:
        body = kopf.Body(
            {
                "metadata": {"name": "demo-train-1"},
                "spec": {},
                "status": {"active": 1, "conditions": [{"type": condition, "status": "True"}]},
            }
        )
        return seen_job("demo-train-1", {"app.kubernetes.io/component": "train"}, body).state

    assert seen("FailureTarget") == "Failed"
    assert seen("SuccessCriteriaMet") == "Complete"


def test_a_pending_pods_reason_comes_from_its_container_or_the_scheduler() -> None:
    def waiting(status: dict[str, object]) -> tuple[str, str]:
        body = kopf.Body({"metadata": {"name": "p"}, "status": {"phase": "Pending", **status}})
        state = seen_pod("p", {}, body).state
        return state.waiting_reason, state.waiting_message

    secret = {
        "containerStatuses": [
            {
                "state": {
                    "waiting": {
                        "reason": "CreateContainerConfigError",
                        "message": 'secret "hf-token" not found',
                    }
                }
            }
        ]
    }
    assert waiting(secret) == ("CreateContainerConfigError", 'secret "hf-token" not found')
    pvc = {
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": 'persistentvolumeclaim "dpo-runs" not found',
            }
        ]
    }
    assert waiting(pvc) == ("Unschedulable", 'persistentvolumeclaim "dpo-runs" not found')
    creating = {"containerStatuses": [{"state": {"waiting": {"reason": "ContainerCreating"}}}]}
    assert waiting(creating) == ("", "")


def test_a_champion_that_changed_after_the_gate_fails_the_run_without_a_retry() -> None:
    from dpo_contract.pod import EXIT_CHAMPION_CHANGED

    lost = pod(
        "Failed",
        EXIT_CHAMPION_CHANGED,
        '{"status":"champion-changed","message":"the gate beat sha256:a, but ... now points at '
        'other-1 (sha256:b), promoted meanwhile by another run"}',
    )
    done = (
        child("train", 1, "Complete", pod("Succeeded", 0)),
        child("eval", 1, "Complete", pod("Succeeded", 0, GATE_PASSED)),
        child("promote", 1, "Failed", lost),
    )
    decision = decide(job(status={"phase": "Promoting", "attempt": 1}), observed(*done))
    assert decision.status.phase == "Failed"
    failed = next(c for c in decision.status.conditions if c.type == "Failed")
    assert failed.reason == "ChampionChanged"
    assert "promoted meanwhile by another run" in (decision.status.message or "")


def test_a_first_gate_with_must_beat_promoted_reads_as_passed() -> None:
    """Nothing promoted yet: the beatsPromoted criterion has no value, and the trainer writes
    none; the operator must still read the verdict (it read "the gate could not run")."""
    evaluated = (
        child("train", 1, "Complete", pod("Succeeded", 0)),
        child("eval", 1, "Complete", pod("Succeeded", 0, GATE_PASSED_FIRST)),
    )
    decision = decide(job(status={"phase": "Evaluating", "attempt": 1}), observed(*evaluated))
    assert decision.status.phase == "Promoting", decision.status.message
    assert decision.status.evaluation is not None
    assert decision.status.evaluation.verdict == "Passed"
