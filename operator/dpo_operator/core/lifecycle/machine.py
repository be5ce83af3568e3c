"""The DPOJob state machine: one pure function from (DPOJob, what the cluster shows) to
(actions, new status, events).

It is level-triggered: it reads only the DPOJob (spec and status) and the observed children,
never memory of past events, so a restarted operator carries on from cluster state alone and the
same observations always give the same decision.

    Pending -> (Initializing) -> (Queued) -> Training -> Evaluating -> (AwaitingApproval)
        -> Promoting -> Succeeded
    Initializing -> Failed (the model cannot be resolved, or does not fit once counted)
    Training -> Suspended | restart (attempt + 1) | Failed (bad input, restarts, deadline)
    Evaluating -> Rejected

Invariants (property-tested): a promote Job is only created after the eval Job of the same
training attempt succeeded with verdict Passed; restarts never exceed runPolicy.maxRestarts;
there is never more than one training Job; no training Job is created before the model
initializer (where the job has one) reported the model's size.
"""

from __future__ import annotations

from datetime import datetime

from dpo_contract.config import HEALTH_ADVICE
from dpo_contract.pod import (
    EXIT_BAD_INPUT,
    EXIT_CHAMPION_CHANGED,
    EXIT_GATE_REJECTED,
    EXIT_WRONG_ENVIRONMENT,
)
from dpo_contract.reports import (
    Failure,
    GateVerdict,
    ModelReport,
    PromotionResult,
    TrainingSummary,
)

from dpo_operator.api import (
    TERMINAL_PHASES,
    DPOJob,
    DPOJobStatus,
    EvaluationStatus,
    HeldOutStatus,
    Phase,
    ProgressStatus,
    PromotionStatus,
    TrainingMetrics,
    spec_digest,
)
from dpo_operator.core.lifecycle.approval import approved, how_to_approve
from dpo_operator.core.lifecycle.decision import (
    Create,
    Decision,
    Delete,
    DeleteChildren,
    Suspend,
    Update,
)
from dpo_operator.core.lifecycle.observed import (
    STOP_ANNOTATION,
    ChildJob,
    Component,
    Observed,
    reason_of,
    telling_pod,
)
from dpo_operator.core.lifecycle.recording import Recorder
from dpo_operator.core.lifecycle.timing import active_seconds, progress, requeue_after
from dpo_operator.core.plan import model_status, plan_status
from dpo_operator.core.resolve import ResolvedJob, resolve
from dpo_operator.core.serving import with_vllm_instructions
from dpo_operator.core.storage import initializes_model
from dpo_operator.core.topology import unsatisfiable_topology


def decide(job: DPOJob, observed: Observed) -> Decision:
    """What to do next for `job`, given the children observed now."""
    status = (job.status or DPOJobStatus()).model_copy(deep=True)
    status.observed_generation = job.metadata.generation
    status.attempt = status.attempt or 1
    decision = Decision(status)
    _Machine(job, observed, decision).run()
    decision.requeue_after = requeue_after(job, decision.status, observed.now)
    return decision


class _Machine(Recorder):
    """One decision: `run` walks the stages in order and stops at the first still under way."""

    def __init__(self, job: DPOJob, observed: Observed, decision: Decision) -> None:
        super().__init__(job, decision, observed.now)
        self.spec = job.spec
        self.observed = observed
        self.digest = spec_digest(job.spec)

    def child(self, component: Component, attempt: int) -> ChildJob | None:
        return next(
            (j for j in self.observed.jobs if j.component == component and j.attempt == attempt),
            None,
        )

    def finish(self, phase: Phase, message: str, reason: str) -> None:
        self.phase(phase, message, reason)
        self.status.completion_time = self.status.completion_time or self.now
        self.condition("Training", False, reason, message)
        if phase != "Stopped":  # stopped on request: neither
            self.condition("Succeeded" if phase == "Succeeded" else "Failed", True, reason, message)
        for child in self.observed.jobs:
            if child.state in ("Pending", "Running") and not child.deleting:
                self.act(Delete(child.name))

    # -- the machine ---------------------------------------------------------------------------

    def run(self) -> None:
        self.condition("SpecValid", True, "Valid", "the spec is valid")
        if self.status.phase in TERMINAL_PHASES:
            self.expire_children()
            return
        if self.observed.refused is not None:
            self.finish("Failed", f"cannot create a child: {self.observed.refused}", "ChildRefused")
            return
        stop = self.job.metadata.annotations.get(STOP_ANNOTATION)
        if stop is not None:
            # Deleted, not suspended: Kueue re-admits a queued Job someone else suspends, and
            # a deleted Job gives its quota back.
            self.finish(
                "Stopped", f"stopped ({STOP_ANNOTATION}): {stop}; checkpoints kept", "Stopped"
            )
            return
        if not self.observed.has_config_map:
            self.act(Create("config"))
        elif self.observed.config_spec_digest not in (None, "", self.digest):
            # Pods read trainer.json when they start: the next ones get the edited spec.
            self.act(Update("config"))
        if not self.observed.has_service:
            self.act(Create("service"))
        if not self.observed.has_network_policy:
            self.act(Create("network-policy"))
        if self.deadline_exceeded() or not self.initialized():
            return
        attempt = self.status.attempt or 1
        train = self.child("train", attempt)
        if train is None or train.state != "Complete":
            self.training(train, attempt)
            return
        self.trained(train)
        if not self.spec.eval_gate.enabled:
            self.finish("Succeeded", "training finished; no gate configured", "Trained")
            return
        evaluation = self.child("eval", attempt)
        if not self.evaluated(evaluation, attempt):
            return
        if self.spec.promotion is None:
            self.finish("Succeeded", "the gate passed; no promotion target", "GatePassed")
            return
        self.promoting(attempt)

    def resolved(self) -> ResolvedJob:
        """The job resolved with the status decided so far (the initializer's count in it)."""
        return resolve(self.job.model_copy(update={"status": self.status}))

    def initialized(self) -> bool:
        """The model initializer: before the first training Job asks for a GPU, resolve the
        model and count it. True once `status.model` records it, or the job has none."""
        if not initializes_model(self.spec) or self.status.model is not None:
            return True
        name = self.spec.model.name
        init = self.child("init", 1)
        if init is None:
            self.clock_stopped(self.spec.run_policy.suspend)
            if self.spec.run_policy.suspend:
                self.suspended("no pods run")
                return False
            self.act(Create("init", 1))
            self.status.output = self.status.output or self.spec.output  # it stages there
            self.status.waiting_since = self.now
            self.status.start_time = self.status.start_time or self.now
            self.phase("Initializing", f"resolving {name} and counting its parameters")
            return False
        if init.state in ("Pending", "Running"):
            started = sum(pod.phase != "Pending" for pod in init.pods)
            if not self.not_started(init, started, 1):
                self.phase("Initializing", f"resolving {name} and counting its parameters")
            return False
        pod = telling_pod(init)
        report = pod.reported if pod else None
        if init.state != "Complete" or not isinstance(report, ModelReport):
            self.finish(
                "Failed", f"model {name} cannot be used: {reason_of(pod)}", "ModelUnresolved"
            )
            return False
        model = self.status.model = model_status(report)
        self.status.waiting_since = None
        size = f"{model.parameters / 1e9:.2f}B parameters"
        at = f" at {model.revision}" if model.revision else ""
        staged = f"; copied to {model.staged}" if model.staged else ""
        self.event(
            "ModelResolved",
            f"{name}{at}: {size}, {model.bytes_on_disk / 1e9:.1f} GB of weights{staged}",
        )
        problems = self.resolved().plan.problems
        if problems:
            self.finish(
                "Failed",
                f"{name} ({size}, counted) does not fit as asked: " + "; ".join(problems),
                "DoesNotFit",
            )
            return False
        if self.observed.has_config_map and Update() not in self.decision.actions:
            self.act(Update())  # trainer.json and the FSDP settings from the counted plan
        return True

    def deadline_exceeded(self) -> bool:
        limit = self.spec.run_policy.active_deadline_seconds
        active = active_seconds(self.status, self.now)
        if limit is None or active is None or active <= limit:
            return False
        self.finish(
            "Failed",
            f"ran {active:.0f}s, over runPolicy.activeDeadlineSeconds {limit}",
            "DeadlineExceeded",
        )
        return True

    def training(self, train: ChildJob | None, attempt: int) -> None:
        others = [
            j
            for j in self.observed.jobs
            if j.component == "train" and j.attempt != attempt and not j.deleting
        ]
        for stale in others:  # never two training Jobs at once
            self.act(Delete(stale.name))
        suspend = self.spec.run_policy.suspend
        self.clock_stopped(suspend)
        nodes = self.spec.resources.nodes
        waiting = f"attempt {attempt}: waiting for {nodes} pod(s) to start"
        if train is None:
            if any(j.component == "train" for j in self.observed.jobs):
                self.phase(
                    "Training",
                    f"waiting for the previous attempt to go before attempt {attempt} starts",
                    "Restarting",
                )
                return
            if suspend:
                self.suspended("no pods run")
                return
            blocked = unsatisfiable_topology(self.spec, self.observed.nodes or ())
            if blocked is not None:
                self.finish("Failed", blocked, "TopologyUnsatisfiable")
                return
            self.act(Create("train", attempt))
            resolved = self.resolved()
            self.status.plan = plan_status(self.spec, resolved.plan, resolved.training_disk)
            self.status.output = self.status.output or self.spec.output
            if attempt == 1:
                self.warn_when_preemption_loses_work(resolved)
            if self.queued_by_kueue():
                # Created suspended: nothing changes until Kueue admits it, so say so now.
                self.status.waiting_since = None
                self.phase("Queued", f"attempt {attempt}: waiting for Kueue to admit it")
                return
            self.status.waiting_since = self.now
            if self.status.start_time is None:
                self.status.start_time = self.now
            self.phase("Pending", waiting)
            return
        if train.state == "Failed":
            self.training_failed(train, attempt)
            return
        if train.deleting:
            self.phase("Pending", f"{train.name} goes first; it is re-created from the edited spec")
            return
        if train.suspended and train.spec_digest not in ("", self.digest):
            # Edited while it waited (queued or suspended): no pod runs it, so it is re-created
            # from the spec as it is now instead of starting as it was.
            self.act(Delete(train.name))
            self.phase("Pending", f"the spec changed while {train.name} waited; re-creating it")
            return
        if train.suspended != suspend and not (train.suspended and self.queued_by_kueue()):
            self.act(Suspend(train.name, suspend))
        if suspend:
            self.status.waiting_since = None
            self.suspended("checkpoints are kept")
            return
        if train.suspended:
            self.status.waiting_since = None  # admission is Kueue's wait, not a stall
            self.phase("Queued", f"waiting for Kueue to admit {train.name}")
            return
        if self.status.start_time is None:
            self.status.start_time = self.now
        # A pod that finished (either way) before its Job did has started all the same.
        started = sum(pod.phase != "Pending" for pod in train.pods)
        if self.not_started(train, started, nodes):
            return
        if started == 0:
            self.phase("Pending", waiting)
            return
        self.phase("Training", f"attempt {attempt}: {started}/{nodes} pods started")
        self.condition("Training", True, "Running", f"attempt {attempt}")
        if self.observed.fabric is not None:
            self.status.fabric = self.observed.fabric
        if self.observed.metrics is not None:
            self.status.metrics = self.observed.metrics
            self.status.progress = progress(self.observed.metrics) or self.status.progress
            self.health(self.observed.metrics)

    def degraded(self, reason: str, message: str, event: str) -> None:
        """Degraded=True; an Event when it turns True or says something new."""
        current = self.current("Degraded")
        if current is None or current.status != "True" or current.message != message:
            self.event(event, message, warning=True)
        self.condition("Degraded", True, reason, message)

    def health(self, metrics: TrainingMetrics) -> None:
        """The Degraded condition from the health signals that hold at rank 0's latest log."""
        reasons = metrics.degraded
        if reasons:
            said = {"Straggler": metrics.straggler}
            message = "; ".join(
                f"{reason}: "
                + (f"{said[reason]}; " if said.get(reason) else "")
                + HEALTH_ADVICE[reason]
                for reason in reasons
            )
            self.degraded(reasons[0], message, "Degraded")
        elif self.holds("Degraded"):
            self.condition("Degraded", False, "Healthy", "no health signal holds at the latest log")

    def trained(self, train: ChildJob) -> None:
        """What the finished run says of its health: every signal it raised (the scrapes may
        have missed one), and whether it stopped early on one."""
        pod = telling_pod(train)
        summary = pod.reported if pod else None
        if not isinstance(summary, TrainingSummary):
            return
        if summary.fabric is not None:
            self.status.fabric = summary.fabric
        hours = summary.gpu_hours
        self.status.progress = ProgressStatus(
            percent=100.0,
            eta_seconds=0,
            summary="100%" + (f" {hours:.1f} GPU-h" if hours is not None else ""),
            gpu_hours=hours,
        )
        said = "; ".join(f"{signal.reason}: {signal.message}" for signal in summary.health)
        stopped = summary.stopped_early
        if stopped is not None:
            message = (
                f"training stopped at step {stopped.step} on {stopped.reason} "
                f"(spec.health.action: stop); the adapter is checkpoint-{stopped.kept_step}'s "
                f"weights. {said}"
            )
            self.degraded(stopped.reason, message, "StoppedEarly")
        elif summary.health:
            self.degraded(summary.health[0].reason, f"raised while training: {said}", "Degraded")
        elif self.current("Degraded") is not None:
            self.condition("Degraded", False, "Healthy", "training ended with no health signal")

    def warn_when_preemption_loses_work(self, resolved: ResolvedJob) -> None:
        """Before training starts: when a checkpoint on SIGTERM does not fit in the grace
        period, a preemption loses the steps since the last periodic checkpoint. Say so."""
        if resolved.saves_on_signal:
            return
        needed = resolved.save_seconds
        self.event(
            "NoSaveOnPreemption",
            f"a checkpoint on SIGTERM needs about {needed} s (writing and sending each pod's "
            f"share), more than runPolicy.terminationGracePeriodSeconds "
            f"({resolved.grace_period_seconds} s): a preempted or evicted run resumes from its "
            f"last periodic checkpoint (dpo.saveSteps {self.spec.dpo.save_steps}); raise the "
            "grace period, or save more often",
            warning=True,
        )

    def not_started(self, child: ChildJob, started: int, wanted: int) -> bool:
        """Tracks a Job whose pods have not all started: says why in the Stalled condition and
        fails the run at runPolicy.startupTimeoutSeconds (counted from `waiting_since`, which
        is set when the Job is created, so keeping it costs no write). True when the run
        ended."""
        if started >= wanted:
            if self.holds("Stalled"):
                self.condition("Stalled", False, "Started", f"every pod of {child.name} started")
            return False
        since = self.status.waiting_since = self.status.waiting_since or self.now
        stuck = [p for p in child.pods if p.phase == "Pending" and p.waiting_reason]
        why = "; ".join(
            f"pod {p.name}: {p.waiting_reason}: {p.waiting_message}".rstrip(": ") for p in stuck
        )
        if stuck:
            stalled = self.current("Stalled")
            if stalled is None or stalled.status != "True":
                self.event("Stalled", why[:1000], warning=True)
            self.condition("Stalled", True, stuck[0].waiting_reason, why[:4000])
        limit = self.spec.run_policy.startup_timeout_seconds
        if (self.now - since).total_seconds() <= limit:
            return False
        if not child.pods:
            why = (
                f"no pod was created; `kubectl describe job {child.name}` shows why "
                "(FailedCreate: a quota, an admission policy)"
            )
        self.finish(
            "Failed",
            f"{started}/{wanted} pod(s) of {child.name} started within "
            f"runPolicy.startupTimeoutSeconds ({limit}s): {why or 'pods still Pending'}",
            "StartupTimeout",
        )
        return True

    def clock_stopped(self, stopped: bool) -> None:
        """Suspended or waiting for a person: that time is not counted against the deadline."""
        if stopped and self.status.suspended_at is None:
            self.status.suspended_at = self.now
        if not stopped and self.status.suspended_at is not None:
            self.status.suspended_seconds += (self.now - self.status.suspended_at).total_seconds()
            self.status.suspended_at = None
        if not self.spec.run_policy.suspend and self.holds("Suspended"):
            self.condition("Suspended", False, "Resumed", "runPolicy.suspend is false")

    def suspended_after_training(self, child: ChildJob | None, what: str) -> bool:
        """runPolicy.suspend holds for the gate and the promotion too: their Job is suspended
        (or not created yet) until it is false again. True while suspended."""
        suspend = self.spec.run_policy.suspend
        self.clock_stopped(suspend)
        if (
            child is not None
            and child.state in ("Pending", "Running")
            and child.suspended != suspend
            and not (child.suspended and self.queued_by_kueue())
        ):
            self.act(Suspend(child.name, suspend))
        if suspend:
            self.suspended(f"{what} waits")
        return suspend

    def suspended(self, what: str) -> None:
        """Phase Suspended and the condition that says so; `what` says what waits."""
        self.phase("Suspended", f"runPolicy.suspend is true; {what}")
        self.condition("Suspended", True, "Suspended", "suspended by runPolicy.suspend")

    def queued_by_kueue(self) -> bool:
        return self.spec.scheduling.queue_name is not None and not self.spec.run_policy.suspend

    def training_failed(self, train: ChildJob, attempt: int) -> None:
        failed = [pod for pod in train.pods if pod.phase == "Failed"]
        bad_input = next((p for p in failed if p.exit_code == EXIT_BAD_INPUT), None)
        if bad_input is not None:
            self.finish("Failed", f"bad config or data: {reason_of(bad_input)}", "BadInput")
            return
        wrong = next((p for p in failed if p.exit_code == EXIT_WRONG_ENVIRONMENT), None)
        if wrong is not None:
            said = wrong.reported if isinstance(wrong.reported, Failure) else None
            if said is not None and said.reason is not None:  # the fabric: FabricSlow, ...
                self.finish("Failed", f"{said.reason}: {reason_of(wrong)}", said.reason)
                return
            self.finish(
                "Failed",
                f"the pods are not what was rendered: {reason_of(wrong)}",
                "WrongEnvironment",
            )
            return
        disrupted = bool(failed) and all(pod.disrupted for pod in failed)
        restarts = self.status.restarts
        if not disrupted and restarts >= self.spec.run_policy.max_restarts:
            codes = sorted({p.exit_code for p in failed if p.exit_code is not None})
            self.finish(
                "Failed",
                f"attempt {attempt} failed (exit codes {codes}) and runPolicy.maxRestarts "
                f"({self.spec.run_policy.max_restarts}) restarts are used up",
                "RestartsExhausted",
            )
            return
        if not disrupted:
            self.status.restarts = restarts + 1
        self.status.attempt = attempt + 1
        self.status.waiting_since = None
        self.act(Delete(train.name))
        why = (
            "pods were disrupted (not counted)"
            if disrupted
            else (f"restart {self.status.restarts}/{self.spec.run_policy.max_restarts}")
        )
        self.event(
            "Restarting",
            f"attempt {attempt} failed; {why}; resuming from the last checkpoint",
            warning=True,
        )
        self.phase("Training", f"restarting from the last checkpoint ({why})", "Restarting")

    def evaluated(self, evaluation: ChildJob | None, attempt: int) -> bool:
        """Runs the gate; True once it passed."""
        if self.suspended_after_training(evaluation, "the gate"):
            return False
        if evaluation is None:
            self.act(Create("eval", attempt))
            self.status.waiting_since = self.now
            self.condition("Training", False, "Trained", f"attempt {attempt} finished")
            self.phase("Evaluating", "running the held-out gate", "Trained")
            return False
        if evaluation.state in ("Pending", "Running"):
            started = sum(pod.phase != "Pending" for pod in evaluation.pods)
            if not self.not_started(evaluation, started, 1):
                self.phase("Evaluating", "running the held-out gate")
            return False
        pod = telling_pod(evaluation)
        verdict = pod.reported if pod else None
        passed = isinstance(verdict, GateVerdict) and verdict.verdict == "Passed"
        if evaluation.state == "Complete" and isinstance(verdict, GateVerdict) and passed:
            self.record_verdict(verdict)
            return True
        if isinstance(verdict, GateVerdict) and pod and pod.exit_code == EXIT_GATE_REJECTED:
            self.record_verdict(verdict)
            self.finish(
                "Rejected",
                verdict.message or "the gate rejected the adapter",
                _gate_reason(verdict),
            )
            return False
        self.finish("Failed", f"the gate could not run: {reason_of(pod)}", "GateFailed")
        return False

    def record_verdict(self, verdict: GateVerdict) -> None:
        passed = verdict.verdict == "Passed"
        message = verdict.message or ("every criterion holds" if passed else "gate rejected")
        if self.status.evaluation is None:
            self.event(_gate_reason(verdict), message, warning=not passed)
        self.status.evaluation = EvaluationStatus(
            verdict=verdict.verdict,
            adapter_digest=verdict.adapter_digest,
            criteria=list(verdict.criteria),
            held_out=HeldOutStatus.model_validate(verdict.held_out.model_dump())
            if verdict.held_out
            else None,
        )
        self.condition("GatePassed", passed, verdict.verdict, message)

    def promoting(self, attempt: int) -> None:
        promotion = self.spec.promotion
        assert promotion is not None
        promote = self.child("promote", attempt)
        if self.suspended_after_training(promote, "the promotion"):
            return
        if promote is None:
            waiting = promotion.mode == "manual" and not approved(self)
            # Waiting for a person is not running: like a suspension, off the deadline's clock.
            self.clock_stopped(waiting)
            if waiting:
                self.phase("AwaitingApproval", how_to_approve(self.job.name, self.status))
                return
            self.act(Create("promote", attempt))
            self.status.waiting_since = self.now
            self.phase("Promoting", f"publishing to {promotion.target}")
            return
        if promote.state in ("Pending", "Running"):
            started = sum(pod.phase != "Pending" for pod in promote.pods)
            if not self.not_started(promote, started, 1):
                self.phase("Promoting", f"publishing to {promotion.target}")
            return
        pod = telling_pod(promote)
        result = pod.reported if pod else None
        if promote.state == "Complete" and isinstance(result, PromotionResult):
            self.status.promotion = with_vllm_instructions(
                self.job,
                PromotionStatus(
                    version=result.version,
                    uri=result.uri,
                    digest=result.digest,
                    at=datetime.fromisoformat(result.promoted_at),
                ),
            )
            self.condition("Promoted", True, "Promoted", result.uri)
            self.finish("Succeeded", f"promoted {result.version} to {result.uri}", "Promoted")
            return
        if pod is not None and pod.exit_code == EXIT_CHAMPION_CHANGED:
            self.finish("Failed", f"not promoted: {reason_of(pod)}", "ChampionChanged")
            return
        self.finish("Failed", f"promotion failed: {reason_of(pod)}", "PromotionFailed")

    def expire_children(self) -> None:
        ttl = self.spec.run_policy.ttl_seconds_after_finished
        if ttl is None or self.status.children_deleted or self.status.completion_time is None:
            return
        if (self.now - self.status.completion_time).total_seconds() >= ttl:
            self.act(DeleteChildren(tuple(child.name for child in self.observed.jobs)))
            self.status.children_deleted = True
            self.event(
                "ChildrenDeleted",
                f"ttlSecondsAfterFinished ({ttl}s) passed; the record and the artifacts stay",
            )


def _gate_reason(verdict: GateVerdict) -> str:
    """GatePassed, GateRejected, or GateInconclusive (too few pairs to be sure either way)."""
    return f"Gate{verdict.verdict}"
