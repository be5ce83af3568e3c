"""The DPOJob state machine: every transition, and invariants over random child states."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from dpo_operator.api import DPOJob, DPOJobStatus, OutputSpec, TrainingMetrics
from dpo_operator.core.lifecycle import (
    ChildJob,
    Create,
    Delete,
    DeleteChildren,
    Observed,
    PodState,
    Suspend,
    Update,
    decide,
)
from dpo_operator.core.validate import parse_dpojob
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import example, example_manifest, job_with
from tests.reports import (
    BAD_INPUT,
    FABRIC_SLOW,
    MODEL_BAD_INPUT,
    PROMOTED,
    STOPPED_EARLY,
    TRAINED,
    TRAINED_DEGRADED,
    TRAINED_WITH_A_STRAGGLER,
    model_report,
)
from tests.reports import GATE_INCONCLUSIVE as INCONCLUSIVE
from tests.reports import GATE_PASSED as PASSED
from tests.reports import GATE_REJECTED as REJECTED

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
KINDS_OF_CONFIG = ("config", "service", "network-policy")
QWEN3_32B = model_report("qwen3-32b", 32_762_123_264, 151_936 * 5120)


# What the model initializer recorded of org/model-7b (a Llama-shaped 7B): the jobs below start
# where it left them, unless a test is about the initializer.
COUNTED: dict[str, Any] = {
    "name": "org/model-7b",
    "parameters": 6_738_415_616,
    "hidden": 4096,
    "layers": 32,
    "intermediate": 11008,
    "vocab": 32000,
    "kvRatio": 1.0,
    "largestTensor": 131_072_000,
    "bytesOnDisk": 13_476_839_424,
}


def job(
    status: dict[str, Any] | None = None,
    annotations: dict[str, str] | None = None,
    initialized: bool = True,
    **spec: Any,
) -> DPOJob:
    base = job_with(**{"promotion": {"target": "s3://m"}, **spec})
    update: dict[str, Any] = {}
    if initialized:
        status = {"model": COUNTED, **(status or {})}
    if status is not None:
        update["status"] = DPOJobStatus.model_validate(status)
    if annotations:
        update["metadata"] = base.metadata.model_copy(update={"annotations": annotations})
    return base.model_copy(update=update)


def child(
    component: str,
    attempt: int,
    outcome: str,
    *pods: PodState,
    suspended: bool = False,
    deleting: bool = False,
) -> ChildJob:
    names = {"train": "demo-train", "eval": "demo-eval", "promote": "demo-promote"}
    return ChildJob(
        f"{names[component]}-{attempt}",
        component,
        attempt,
        suspended,  # type: ignore[arg-type]
        outcome,
        deleting,
        tuple(pods),
    )  # type: ignore[arg-type]


def observed(*jobs: ChildJob, now: datetime = NOW) -> Observed:
    return Observed(now=now, jobs=jobs, has_config_map=True, has_service=True)


def pod(
    phase: str, exit_code: int | None = None, message: str = "", disrupted: bool = False
) -> PodState:
    return PodState("p", phase, exit_code, message, disrupted)


def test_a_new_job_gets_its_config_service_and_first_training_job() -> None:
    decision = decide(job(), Observed(now=NOW))
    assert decision.actions == [Create("config"), Create("service"), Create("train", 1)]
    assert decision.status.phase == "Pending"
    assert decision.status.attempt == 1


def test_running_pods_mean_training() -> None:
    decision = decide(job(), observed(child("train", 1, "Running", pod("Running"))))
    assert decision.status.phase == "Training"
    assert decision.status.start_time == NOW
    assert decision.actions == []
    assert any(c.type == "Training" and c.status == "True" for c in decision.status.conditions)


def test_pods_that_have_not_started_keep_the_run_pending() -> None:
    decision = decide(job(), observed(child("train", 1, "Pending", pod("Pending"))))
    assert decision.status.phase == "Pending"
    assert decision.status.message == "attempt 1: waiting for 1 pod(s) to start"
    assert not any(c.type == "Training" for c in decision.status.conditions)


@pytest.mark.parametrize("ended", [pod("Succeeded", 0), pod("Failed", 137)])
def test_a_pod_that_ended_before_its_job_changes_nothing_in_status(ended: PodState) -> None:
    running = decide(job(), observed(child("train", 1, "Running", pod("Running"))))
    later = job(status=running.status.model_dump(by_alias=True))
    finished = decide(later, observed(child("train", 1, "Running", ended)))
    assert finished.status == running.status, "the Job has not ended yet: nothing new to say"


def test_conditions_keep_their_order_when_one_changes() -> None:
    running = decide(job(), observed(child("train", 1, "Running", pod("Running"))))
    later = job(status=running.status.model_dump(by_alias=True))
    evaluating = decide(later, observed(child("train", 1, "Complete", pod("Succeeded", 0))))
    types = [c.type for c in evaluating.status.conditions]
    assert types == [c.type for c in running.status.conditions]


def test_a_queued_job_waits_for_kueue() -> None:
    queued = job(scheduling={"queueName": "q"})
    decision = decide(queued, observed(child("train", 1, "Pending", suspended=True)))
    assert decision.status.phase == "Queued"
    assert decision.actions == [], "Kueue unsuspends the Job, not the operator"


def test_a_queued_job_is_queued_from_the_moment_its_suspended_job_is_created() -> None:
    # Nothing about the Job changes until Kueue admits it, so no later reconcile would say it.
    queued = job(scheduling={"queueName": "q"})
    decision = decide(queued, observed())
    assert Create("train", 1) in decision.actions
    assert decision.status.phase == "Queued"
    assert decision.status.waiting_since is None, "admission is Kueue's wait, not a stall"
    assert decision.status.start_time is None


def test_suspend_stops_the_pods_and_resume_starts_them_again() -> None:
    suspended = job(runPolicy={"suspend": True})
    decision = decide(suspended, observed(child("train", 1, "Running", pod("Running"))))
    assert decision.actions == [Suspend("demo-train-1", True)]
    assert decision.status.phase == "Suspended"
    assert decision.status.suspended_at == NOW

    later = NOW + timedelta(minutes=10)
    resumed = job(status=decision.status.model_dump(by_alias=True))
    decision = decide(resumed, observed(child("train", 1, "Pending", suspended=True), now=later))
    assert decision.actions == [Suspend("demo-train-1", False)]
    assert decision.status.suspended_seconds == 600
    assert decision.status.suspended_at is None


def test_a_stop_annotation_ends_the_run_deleting_its_jobs_and_says_why() -> None:
    """What a DPOSweep does to a trial that cannot win, and a person to a run not needed: the
    Jobs deleted (a queued one gives its Kueue quota back), Stopped, for good."""
    reason = "held-out margin per beta at most 0.1, below trial 1's lower bound 0.8"
    stopped = job(
        scheduling={"queueName": "q"},
        status={"attempt": 1, "phase": "Training"},
        annotations={"dpo.dev/stop": reason},
    )
    decision = decide(stopped, observed(child("train", 1, "Running", pod("Running"))))
    assert decision.actions == [Delete("demo-train-1")]
    assert decision.status.phase == "Stopped"
    assert decision.status.message == f"stopped (dpo.dev/stop): {reason}; checkpoints kept"
    assert ("Normal", "Stopped") in [(e.type, e.reason) for e in decision.events]
    types = {c.type for c in decision.status.conditions if c.status == "True"}
    assert not types & {"Failed", "Succeeded"}, "stopped on request: neither"
    after = decide(
        job(status=decision.status.model_dump(by_alias=True), annotations={"dpo.dev/stop": "x"}),
        observed(),
    )
    assert after.actions == []
    assert after.status.phase == "Stopped"


def test_a_retryable_failure_restarts_the_whole_group_from_its_checkpoint() -> None:
    failed = child("train", 1, "Failed", pod("Failed", 1, "NCCL error"), pod("Failed", 137))
    decision = decide(job(status={"attempt": 1, "phase": "Training"}), observed(failed))
    assert decision.actions == [Delete("demo-train-1")]
    assert decision.status.restarts == 1
    assert decision.status.attempt == 2
    assert any(e.reason == "Restarting" for e in decision.events)
    # Next round: the old Job is gone, so attempt 2 is created.
    after = decide(job(status=decision.status.model_dump(by_alias=True)), observed())
    assert after.actions == [Create("train", 2)]


def test_the_next_attempt_waits_until_the_old_job_is_gone() -> None:
    status = {"attempt": 2, "restarts": 1, "phase": "Training"}
    old = child("train", 1, "Failed", pod("Failed", 1), deleting=True)
    decision = decide(job(status=status), observed(old))
    assert decision.actions == []
    assert decision.status.phase == "Training"


def test_preempted_pods_restart_without_counting() -> None:
    preempted = child("train", 1, "Failed", pod("Failed", 143, disrupted=True))
    decision = decide(job(status={"attempt": 1, "restarts": 3}), observed(preempted))
    assert decision.status.restarts == 3
    assert decision.status.attempt == 2
    assert decision.actions == [Delete("demo-train-1")]


def test_restarts_stop_at_max_restarts() -> None:
    failed = child("train", 4, "Failed", pod("Failed", 1))
    decision = decide(job(status={"attempt": 4, "restarts": 3}), observed(failed))
    assert decision.status.phase == "Failed"
    assert "maxRestarts (3) restarts are used up" in (decision.status.message or "")
    assert decision.actions == []


def test_bad_input_fails_at_once_with_the_trainers_message() -> None:
    failed = child("train", 1, "Failed", pod("Failed", 2, BAD_INPUT))
    decision = decide(job(), observed(failed))
    assert decision.status.phase == "Failed"
    assert decision.status.message == "bad config or data: prefs.jsonl: row 3, column 'chosen'"
    assert decision.status.restarts == 0


def test_pods_that_are_not_what_was_rendered_fail_at_once_and_say_why() -> None:
    message = json.dumps(
        {"status": "wrong-environment", "message": "torch sees no CUDA device; check the driver"}
    )
    failed = child("train", 1, "Failed", pod("Failed", 4, message), pod("Failed", 4, message))
    decision = decide(job(), observed(failed))
    assert decision.status.phase == "Failed"
    assert decision.status.message == (
        "the pods are not what was rendered: torch sees no CUDA device; check the driver"
    )
    assert decision.status.restarts == 0, "the same pods would fail the same way"
    assert not any(isinstance(action, Create) for action in decision.actions)
    failed_condition = next(c for c in decision.status.conditions if c.type == "Failed")
    assert failed_condition.reason == "WrongEnvironment"


def test_finished_training_starts_the_gate() -> None:
    decision = decide(job(), observed(child("train", 1, "Complete", pod("Succeeded", 0))))
    assert decision.actions == [Create("eval", 1)]
    assert decision.status.phase == "Evaluating"


def test_a_passed_gate_starts_the_promotion() -> None:
    jobs = (
        child("train", 1, "Complete"),
        child("eval", 1, "Complete", pod("Succeeded", 0, PASSED)),
    )
    decision = decide(job(), observed(*jobs))
    assert decision.actions == [Create("promote", 1)]
    assert decision.status.phase == "Promoting"
    assert decision.status.evaluation is not None
    assert decision.status.evaluation.verdict == "Passed"


def test_a_rejected_gate_ends_rejected_with_the_failed_criteria() -> None:
    jobs = (child("train", 1, "Complete"), child("eval", 1, "Failed", pod("Failed", 3, REJECTED)))
    decision = decide(job(), observed(*jobs))
    assert decision.status.phase == "Rejected"
    assert "rewardAccuracy 0.0312 (needs >= 0.6)" in (decision.status.message or "")
    assert not any(isinstance(a, Create) and a.kind == "promote" for a in decision.actions)
    assert decision.status.evaluation is not None
    assert decision.status.evaluation.criteria[0].passed is False


def test_an_inconclusive_gate_promotes_nothing_and_says_how_many_pairs_would_decide() -> None:
    eval_pod = pod("Failed", 3, INCONCLUSIVE)
    jobs = (child("train", 1, "Complete"), child("eval", 1, "Failed", eval_pod))
    decision = decide(job(), observed(*jobs))
    assert decision.status.phase == "Rejected"
    assert "about 9346 pairs would decide it" in (decision.status.message or "")
    assert not any(isinstance(a, Create) and a.kind == "promote" for a in decision.actions)
    assert decision.status.evaluation is not None
    assert decision.status.evaluation.verdict == "Inconclusive"
    (accuracy,) = decision.status.evaluation.criteria
    assert (accuracy.low, accuracy.high, accuracy.n) == (0.5121, 0.6999, 100)
    assert accuracy.inconclusive
    assert accuracy.needed_pairs == 9346
    failed = next(c for c in decision.status.conditions if c.type == "Failed")
    assert failed.reason == "GateInconclusive"


def test_manual_promotion_waits_for_the_approval_annotation() -> None:
    jobs = (
        child("train", 1, "Complete"),
        child("eval", 1, "Complete", pod("Succeeded", 0, PASSED)),
    )
    manual = job(promotion={"target": "s3://m", "mode": "manual"})
    waiting = decide(manual, observed(*jobs))
    assert waiting.status.phase == "AwaitingApproval"
    assert waiting.actions == []
    assert waiting.status.message == (
        "the gate passed adapter sha256:ab; approve it with: kubectl annotate --overwrite dpo "
        "demo dpo.dev/approve=sha256:ab"
    )
    approved = job(
        promotion={"target": "s3://m", "mode": "manual"},
        annotations={"dpo.dev/approve": "sha256:ab"},
    )
    assert decide(approved, observed(*jobs)).actions == [Create("promote", 1)]


def test_an_approval_set_before_the_verdict_or_for_another_adapter_is_ignored() -> None:
    """A DPOJob created with the approval already set (or approving an older adapter) waits
    like any other; an Event says why, once."""
    jobs = (
        child("train", 1, "Complete"),
        child("eval", 1, "Complete", pod("Succeeded", 0, PASSED)),
    )
    for value in ("true", "sha256:0ld"):
        preset = job(
            promotion={"target": "s3://m", "mode": "manual"},
            annotations={"dpo.dev/approve": value},
        )
        decision = decide(preset, observed(*jobs))
        assert decision.actions == [], f"approve={value} promoted"
        assert decision.status.phase == "AwaitingApproval"
        (ignored,) = [e for e in decision.events if e.reason == "ApprovalIgnored"]
        assert ignored.message == (
            f"dpo.dev/approve={value} does not approve the adapter the gate passed (sha256:ab): "
            "only an approval given after the verdict, naming that adapter, counts"
        )
        again = job(
            promotion={"target": "s3://m", "mode": "manual"},
            annotations={"dpo.dev/approve": value},
            status=decision.status.model_dump(by_alias=True),
        )
        later = decide(again, observed(*jobs))
        assert not [e for e in later.events if e.reason == "ApprovalIgnored"], "said once"


def test_a_finished_promotion_records_version_and_digest() -> None:
    jobs = (
        child("train", 1, "Complete"),
        child("eval", 1, "Complete", pod("Succeeded", 0, PASSED)),
        child("promote", 1, "Complete", pod("Succeeded", 0, PROMOTED)),
    )
    decision = decide(job(), observed(*jobs))
    assert decision.status.phase == "Succeeded"
    assert decision.status.promotion is not None
    assert decision.status.promotion.version == "quickstart-ab12"
    assert decision.status.completion_time == NOW
    assert any(e.reason == "Promoted" for e in decision.events)


def test_no_promotion_target_means_success_after_the_gate() -> None:
    jobs = (
        child("train", 1, "Complete"),
        child("eval", 1, "Complete", pod("Succeeded", 0, PASSED)),
    )
    decision = decide(job(promotion=None), observed(*jobs))
    assert decision.status.phase == "Succeeded"


def test_the_deadline_fails_the_run_without_counting_suspended_time() -> None:
    start = NOW - timedelta(hours=2)
    running = child("train", 1, "Running", pod("Running"))
    within = job(
        status={"startTime": start, "suspendedSeconds": 3600},
        runPolicy={"activeDeadlineSeconds": 4000},
    )
    assert decide(within, observed(running)).status.phase == "Training"
    over = job(status={"startTime": start}, runPolicy={"activeDeadlineSeconds": 4000})
    decision = decide(over, observed(running))
    assert decision.status.phase == "Failed"
    assert decision.actions == [Delete("demo-train-1")]


def test_ttl_removes_children_once_and_never_recreates_them() -> None:
    done = {"phase": "Succeeded", "completionTime": NOW - timedelta(seconds=120), "attempt": 1}
    expiring = job(status=done, runPolicy={"ttlSecondsAfterFinished": 60})
    decision = decide(expiring, observed(child("train", 1, "Complete")))
    assert decision.actions == [DeleteChildren(("demo-train-1",))]
    assert decision.status.children_deleted is True
    gone = job(
        status=decision.status.model_dump(by_alias=True), runPolicy={"ttlSecondsAfterFinished": 60}
    )
    assert decide(gone, Observed(now=NOW)).actions == [], "terminal runs create nothing"


def test_the_same_observations_give_the_same_decision() -> None:
    jobs = (child("train", 1, "Complete"), child("eval", 1, "Running", pod("Running")))
    first, second = decide(job(), observed(*jobs)), decide(job(), observed(*jobs))
    assert first.actions == second.actions
    assert first.status == second.status


# -- invariants over random child states ----------------------------------------------------

OUTCOMES = st.sampled_from(["Pending", "Running", "Complete", "Failed"])
PODS = st.lists(
    st.builds(
        PodState,
        name=st.just("p"),
        phase=st.sampled_from(["Pending", "Running", "Succeeded", "Failed"]),
        exit_code=st.sampled_from([None, 0, 1, 2, 3, 137]),
        message=st.sampled_from(["", PASSED, REJECTED, PROMOTED, "oops", QWEN3_32B]),
        disrupted=st.booleans(),
    ),
    max_size=3,
)
CHILDREN = st.lists(
    st.builds(
        ChildJob,
        name=st.sampled_from(["a", "b", "c"]),
        component=st.sampled_from(["init", "train", "eval", "promote"]),
        attempt=st.integers(1, 5),
        suspended=st.booleans(),
        state=OUTCOMES,
        deleting=st.booleans(),
        pods=PODS.map(tuple),
    ),
    max_size=6,
)
STATUSES = st.fixed_dictionaries(
    {
        "attempt": st.integers(1, 5),
        "restarts": st.integers(0, 3),
        "phase": st.sampled_from(
            ["Pending", "Training", "Evaluating", "Promoting", "AwaitingApproval"]
        ),
    }
)


@settings(max_examples=400, deadline=None)
@given(
    children=CHILDREN,
    status=STATUSES,
    manual=st.booleans(),
    approved=st.booleans(),
    max_restarts=st.integers(0, 3),
    counted=st.booleans(),
)
def test_invariants_hold_for_any_observed_children(
    children: list[ChildJob],
    status: dict[str, Any],
    manual: bool,
    approved: bool,
    max_restarts: int,
    counted: bool,
) -> None:
    status["restarts"] = min(status["restarts"], max_restarts)
    subject = job(
        status=status,
        initialized=counted,
        annotations={"dpo.dev/approve": "sha256:ab"} if approved else None,
        promotion={"target": "s3://m", "mode": "manual" if manual else "auto"},
        runPolicy={"maxRestarts": max_restarts},
    )
    decision = decide(subject, observed(*children))
    attempt = status["attempt"]

    for action in decision.actions:
        if isinstance(action, Create) and action.kind == "promote":
            evaluation = next(
                c for c in children if c.component == "eval" and c.attempt == action.attempt
            )
            assert evaluation.state == "Complete"
            assert any(
                json.loads(p.message or "{}").get("verdict") == "Passed"
                for p in evaluation.pods
                if p.message.startswith("{")
            )
            assert action.attempt == attempt, "the gate of the same training attempt"
            assert not manual or approved
    assert decision.status.restarts <= max_restarts
    creates_training = [a for a in decision.actions if isinstance(a, Create) and a.kind == "train"]
    if creates_training:
        assert len(creates_training) == 1
        assert not any(c.component == "train" for c in children), "never two training Jobs"
        assert decision.status.model is not None, "never before the initializer counted"


def test_a_spec_edited_while_queued_re_creates_the_waiting_job_and_the_config() -> None:
    from dataclasses import replace

    from dpo_operator.api import spec_digest
    from dpo_operator.core.lifecycle import Update

    before = job(scheduling={"queueName": "q"})
    edited = job(scheduling={"queueName": "q"}, dpo={"beta": 0.3})
    waiting = replace(
        child("train", 1, "Pending", suspended=True), spec_digest=spec_digest(before.spec)
    )
    stale = Observed(
        now=NOW,
        jobs=(waiting,),
        has_config_map=True,
        has_service=True,
        config_spec_digest=spec_digest(before.spec),
    )
    assert decide(before, stale).actions == [], "nothing changed: nothing to redo"
    decision = decide(edited, stale)
    assert Update("config") in decision.actions
    assert Delete("demo-train-1") in decision.actions
    assert "the spec changed while demo-train-1 waited" in (decision.status.message or "")
    going = replace(stale, jobs=(replace(waiting, deleting=True),))
    assert not any(isinstance(a, Create) for a in decide(edited, going).actions)
    gone = replace(stale, jobs=(), config_spec_digest=spec_digest(edited.spec))
    assert decide(edited, gone).actions == [Create("train", 1)]


def test_suspending_alone_does_not_re_create_anything() -> None:
    from dataclasses import replace

    from dpo_operator.api import spec_digest

    running = job()
    suspended = job(runPolicy={"suspend": True})
    assert spec_digest(running.spec) == spec_digest(suspended.spec)
    parked = replace(
        child("train", 1, "Pending", suspended=True), spec_digest=spec_digest(running.spec)
    )
    decision = decide(suspended, observed(parked))
    assert decision.status.phase == "Suspended"
    assert not any(isinstance(a, Delete) for a in decision.actions)


def test_suspend_after_training_suspends_the_gate_and_resume_continues_it() -> None:
    trained = child("train", 1, "Complete", pod("Succeeded", 0))
    gating = child("eval", 1, "Running", pod("Running"))
    evaluating = {"phase": "Evaluating", "attempt": 1, "startTime": NOW.isoformat()}
    decision = decide(
        job(status=evaluating, runPolicy={"suspend": True}), observed(trained, gating)
    )
    assert decision.status.phase == "Suspended"
    assert decision.actions == [Suspend("demo-eval-1", True)]
    assert decision.status.suspended_at == NOW
    parked = child("eval", 1, "Pending", suspended=True)
    later = NOW + timedelta(hours=2)
    resumed = decide(
        job(status=decision.status.model_dump(by_alias=True)), observed(trained, parked, now=later)
    )
    assert resumed.actions == [Suspend("demo-eval-1", False)]
    assert resumed.status.phase == "Evaluating"
    assert resumed.status.suspended_seconds == 7200, "off the deadline's clock"


def degraded(decision: Any) -> Any:
    return next((c for c in decision.status.conditions if c.type == "Degraded"), None)


def test_a_health_signal_on_rank_zero_raises_degraded_once_and_clears_when_it_goes() -> None:
    running = observed(child("train", 1, "Running", pod("Running")))
    signalled = replace(running, metrics=TrainingMetrics(step=30, degraded=["AccuracyStuck"]))
    first = decide(job(), signalled)
    condition = degraded(first)
    assert condition.status == "True"
    assert condition.reason == "AccuracyStuck"
    assert "check the pairs" in condition.message, "says what to try"
    assert [(e.type, e.reason) for e in first.events] == [("Warning", "Degraded")]
    again = decide(job(status=first.status.model_dump(by_alias=True)), signalled)
    assert again.events == [], "one Event per change, not per scrape"
    healthy = replace(running, metrics=TrainingMetrics(step=40, degraded=[]))
    cleared = decide(job(status=again.status.model_dump(by_alias=True)), healthy)
    assert degraded(cleared).status == "False"
    assert degraded(cleared).reason == "Healthy"


def test_a_run_that_stopped_early_says_so_and_which_checkpoint_it_kept() -> None:
    trained = observed(child("train", 1, "Complete", pod("Succeeded", 0, STOPPED_EARLY)))
    decision = decide(job(status={"attempt": 1, "phase": "Training"}), trained)
    condition = degraded(decision)
    assert condition.reason == "NonFiniteLoss"
    assert "stopped at step 30" in condition.message
    assert "checkpoint-20" in condition.message
    assert ("Warning", "StoppedEarly") in [(e.type, e.reason) for e in decision.events]
    assert decision.actions == [Create("eval", 1)], "the gate still decides"


def test_a_signal_the_scrapes_missed_is_reported_when_training_ends() -> None:
    trained = observed(child("train", 1, "Complete", pod("Succeeded", 0, TRAINED_DEGRADED)))
    decision = decide(job(status={"attempt": 1, "phase": "Training"}), trained)
    assert degraded(decision).reason == "NonFiniteLoss"
    assert "raised while training" in degraded(decision).message
    clean = observed(child("train", 1, "Complete", pod("Succeeded", 0, TRAINED)))
    assert degraded(decide(job(status={"attempt": 1, "phase": "Training"}), clean)) is None


def test_a_fabric_too_slow_fails_at_once_under_its_own_reason() -> None:
    failed = child(
        "train", 1, "Failed", pod("Failed", 4, FABRIC_SLOW), pod("Failed", 4, FABRIC_SLOW)
    )
    decision = decide(job(), observed(failed))
    assert decision.status.phase == "Failed"
    assert decision.status.restarts == 0
    failed_condition = next(c for c in decision.status.conditions if c.type == "Failed")
    assert failed_condition.reason == "FabricSlow"
    assert "the slowest pair of nodes is gpu-a-0 and gpu-a-1" in failed_condition.message


def test_a_straggler_is_named_live_and_in_the_end_with_the_fabric() -> None:
    """While training, from rank 0's metrics (the rank, pod and node it names); at the end,
    from the summary, which also gives status.fabric."""
    running = observed(child("train", 1, "Running", pod("Running")))
    live = replace(
        running,
        metrics=TrainingMetrics(
            step=30, degraded=["Straggler"], straggler="rank 5 (pod p-2 on node gpu-b-1) 3.1x"
        ),
    )
    condition = degraded(decide(job(), live))
    assert (condition.status, condition.reason) == ("True", "Straggler")
    assert condition.message.startswith("Straggler: rank 5 (pod p-2 on node gpu-b-1) 3.1x; drain")
    trained = observed(child("train", 1, "Complete", pod("Succeeded", 0, TRAINED_WITH_A_STRAGGLER)))
    decision = decide(job(status={"attempt": 1, "phase": "Training"}), trained)
    assert degraded(decision).reason == "Straggler"
    assert "on node gpu-b-1" in degraded(decision).message
    fabric = decision.status.fabric
    assert fabric is not None
    assert (fabric.transport, fabric.bus_bandwidth_gbps) == ("IB", 180.5)


def test_progress_and_eta_follow_rank_zeros_measured_pace_and_end_with_gpu_hours() -> None:
    running = observed(child("train", 1, "Running", pod("Running")))
    paced = replace(
        running,
        metrics=TrainingMetrics(step=400, max_steps=1000, seconds_per_step=6.5),
    )
    progress = decide(job(), paced).status.progress
    assert progress is not None
    assert (progress.percent, progress.eta_seconds) == (40.0, 3900)
    assert progress.summary == "40% ETA 1h05m"
    unpaced = replace(running, metrics=TrainingMetrics(step=4))
    assert decide(job(), unpaced).status.progress is None, "no total yet: nothing to say"
    summary = TRAINED.replace('"step":40', '"step":40,"gpuHours":12.5')
    trained = observed(child("train", 1, "Complete", pod("Succeeded", 0, summary)))
    done = decide(job(status={"attempt": 1, "phase": "Training"}), trained).status.progress
    assert done is not None
    assert (done.percent, done.summary, done.gpu_hours) == (100.0, "100% 12.5 GPU-h", 12.5)


def initializer(outcome: str, *pods: PodState) -> ChildJob:
    return ChildJob("qwen3-32b-full-init", "init", 1, False, outcome, False, pods)  # type: ignore[arg-type]


def jobs_created(decision: Any) -> list[Create]:
    return [a for a in decision.actions if isinstance(a, Create) and a.kind not in KINDS_OF_CONFIG]


def test_no_gpu_is_asked_for_before_the_initializer_counted_the_model() -> None:
    qwen = example("qwen3-32b-full")
    first = decide(qwen, Observed(now=NOW))
    assert jobs_created(first) == [Create("init", 1)]
    assert first.status.phase == "Initializing"
    assert first.status.plan is None
    assert first.status.model is None
    running = decide(
        qwen.model_copy(update={"status": first.status}),
        Observed(now=NOW, jobs=(initializer("Running", pod("Running")),), has_config_map=True),
    )
    assert running.status.phase == "Initializing"
    assert jobs_created(running) == []


def test_the_initializers_count_is_recorded_and_the_training_job_planned_from_it() -> None:
    """status.model from the report; status.plan (layout, per GPU, per pod) from the count;
    trainer.json re-rendered from it; only then the training Job."""
    qwen = example("qwen3-32b-full")
    done = Observed(
        now=NOW,
        jobs=(initializer("Complete", pod("Succeeded", 0, QWEN3_32B)),),
        has_config_map=True,
        has_service=True,
    )
    decision = decide(qwen, done)
    model = decision.status.model
    assert model is not None
    assert (model.parameters, model.layers, model.hidden) == (32_762_123_264, 64, 5120)
    assert model.revision == "0123456789abcdef0123456789abcdef01234567"
    assert decision.actions[-2:] == [Update(), Create("train", 1)]
    recorded = decision.status.plan
    assert recorded is not None
    assert (recorded.layout, recorded.parameters) == ("fsdp 16", 32_762_123_264)
    assert recorded.model_source == (
        "counted by the initializer: Qwen/qwen3-32b@0123456789abcdef0123456789abcdef01234567"
    )
    assert (recorded.gpu_memory, recorded.gpu_budget) == ("41.8Gi", "72.0Gi")
    assert recorded.disk == "460Gi"
    assert recorded.seconds_per_step is not None
    (resolved,) = [e for e in decision.events if e.reason == "ModelResolved"]
    assert "32.76B parameters, 65.5 GB of weights" in resolved.message


def test_a_model_that_cannot_be_resolved_fails_in_the_initializer_naming_it() -> None:
    qwen = example("qwen3-32b-full")
    failed = Observed(
        now=NOW,
        jobs=(initializer("Failed", pod("Failed", 2, MODEL_BAD_INPUT)),),
        has_config_map=True,
    )
    decision = decide(qwen, failed)
    assert decision.status.phase == "Failed"
    assert decision.status.conditions[-1].reason == "ModelUnresolved"
    assert "model Qwen/Qwen3-32B cannot be used: model Qwen/Qwen3-33B: not found on the hub" in (
        decision.status.message or ""
    )
    assert jobs_created(decision) == []


def test_a_model_counted_too_big_for_the_gpus_asked_is_refused_before_any_gpu() -> None:
    """A LoRA recipe on one 80 GiB GPU for a model no table knows: validation cannot size it;
    the initializer counts 405B."""
    recipe = example_manifest("qwen3-8b-lora")
    recipe["spec"]["model"] = {"name": "acme/mystery-chat"}
    recipe["spec"]["resources"].update({"gpusPerNode": 1, "gpuMemory": "80Gi"})
    big = model_report("llama-3.1-405b", 405_853_388_800, 128_256 * 16384)
    decision = decide(
        parse_dpojob(recipe),
        Observed(
            now=NOW, jobs=(initializer("Complete", pod("Succeeded", 0, big)),), has_config_map=True
        ),
    )
    assert decision.status.phase == "Failed"
    assert decision.status.conditions[-1].reason == "DoesNotFit"
    assert "(405.85B parameters, counted) does not fit as asked" in (decision.status.message or "")
    assert jobs_created(decision) == []


def test_a_run_keeps_the_output_it_started_with_when_the_default_changes() -> None:
    """The installation's default output is recorded at the start: a later default does not
    move a run's checkpoints."""
    manifest = example_manifest("qwen3-8b-lora")
    del manifest["spec"]["output"]
    first = OutputSpec(uri="pvc://team-runs")
    job_then = parse_dpojob(manifest, default_output=first)
    started = decide(job_then, Observed(now=NOW))
    assert started.status.output == first
    manifest["status"] = started.status.model_dump(mode="json", by_alias=True, exclude_none=True)
    later = parse_dpojob(manifest, default_output=OutputSpec(uri="s3://elsewhere/runs"))
    assert later.spec.output == first
