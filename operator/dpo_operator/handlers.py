"""The Kubernetes executor: kopf wiring around `lifecycle.decide`. All of the operator's
Kubernetes I/O is in this module.

kopf keeps one watch stream per kind and, through its indexes, an in-memory view of every
DPOJob and of the Jobs, Pods, ConfigMaps and Services labelled with one (`dpo.dev/job-name`):
a reconcile reads that cache, never GETs or LISTs. Each index update queues its DPOJob; a few
workers take DPOJobs off the queue one at a time each (like controller-runtime's work queue), so
a DPOJob is never reconciled twice at once. A reconcile asks `decide` what to do, creates,
deletes or suspends children, writes status once (a merge patch on /status, only when it
changed) and then posts the decision's events through kopf. Time itself wakes a DPOJob only
when it is due: the next metrics scrape while training, the deadline, the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import heapq
import json
import logging
import math
import time
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import kopf
from dpo_trainer.config import DEGRADED_METRIC, HEALTH_REASONS, HealthReason
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from dpo_operator.api import (
    GROUP,
    KIND,
    PHASES,
    PLURAL,
    SPEC_DIGEST_ANNOTATION,
    TERMINAL_PHASES,
    VERSION,
    DPOJob,
    TrainingMetrics,
    describe_errors,
    parse_dpojob,
)
from dpo_operator.kube import ApiError, KubeAPI, manifest_path, object_path
from dpo_operator.lifecycle import (
    Action,
    ChildJob,
    Create,
    Decision,
    Delete,
    DeleteChildren,
    Event,
    JobState,
    Observed,
    PodState,
    Suspend,
    Update,
    decide,
)
from dpo_operator.policy import refusals
from dpo_operator.render import (
    LABEL_ATTEMPT,
    LABEL_COMPONENT,
    LABEL_JOB,
    NETWORK_POLICY_NAME,
    Manifest,
    Settings,
    config_map_name,
    render_child,
    service_name,
    training_job_name,
)

log = logging.getLogger("dpo_operator")

DPOJOBS = Gauge("dpo_operator_dpojobs", "DPOJobs by phase", ["phase"])
RECONCILE_SECONDS = Histogram("dpo_operator_reconcile_seconds", "Time of one reconcile")
RECONCILE_ERRORS = Counter("dpo_operator_reconcile_errors_total", "Reconciles that failed")
RESTARTS = Counter("dpo_operator_restarts_total", "Training pod groups restarted")
GATE_VERDICTS = Counter("dpo_operator_gate_verdicts_total", "Eval gate verdicts", ["verdict"])
PROMOTIONS = Counter("dpo_operator_promotions_total", "Adapters promoted")
for _verdict in ("Passed", "Rejected"):
    # Exported at 0 from the start, so increase() sees the first verdict as a rise.
    GATE_VERDICTS.labels(verdict=_verdict)

# Events that also move an operator counter.
_COUNTED = {
    "Restarting": lambda: RESTARTS.inc(),
    "GatePassed": lambda: GATE_VERDICTS.labels(verdict="Passed").inc(),
    "GateRejected": lambda: GATE_VERDICTS.labels(verdict="Rejected").inc(),
    "Promoted": lambda: PROMOTIONS.inc(),
}

WORKERS = 16
# A reconcile that failed on the API is tried again after this long, then longer.
RETRY_SECONDS = (1.0, 5.0, 30.0)
SCRAPE_TIMEOUT = 3.0  # for the whole page, not per read
SCRAPE_MAX_BYTES = 1 << 20  # rank 0's page is a few KiB

Key = tuple[str, str]  # (namespace, DPOJob name)


# -- what the indexes keep: only what `decide` reads, not whole objects ---------------------


@dataclass(frozen=True)
class SeenPod:
    job: str
    state: PodState
    rank_zero_ip: str | None  # a running rank 0 serves the training metrics


@dataclass(frozen=True)
class Owned:
    """A child as its index keeps it: what `decide` reads of it (a ChildJob; a name for config
    maps and services), its uid, and the uid of the DPOJob that controls it. The label alone
    proves nothing: anyone can label an object, and a DPOJob deleted and created again under the
    same name is another DPOJob."""

    seen: ChildJob | str
    uid: str
    owner: str
    spec_digest: str = ""


def _owner(labels: Mapping[str, str], namespace: str | None) -> Key:
    return (namespace or "default", labels[LABEL_JOB])


def _controller_uid(body: kopf.Body) -> str:
    references = body.meta.get("ownerReferences") or []
    return next(
        (str(r.get("uid")) for r in references if r.get("kind") == KIND and r.get("controller")),
        "",
    )


@kopf.index(GROUP, VERSION, PLURAL)
def dpojob_bodies(body: kopf.Body, name: str, namespace: str | None, **_: Any) -> dict[Key, bytes]:
    """Each DPOJob as compact JSON: a sixth of the memory of the decoded object, and a
    reconcile decodes it in microseconds."""
    kept = {k: body[k] for k in ("apiVersion", "kind", "spec", "status") if k in body}
    # managedFields is most of a stored object and nothing here reads it.
    kept["metadata"] = {k: v for k, v in body.metadata.items() if k != "managedFields"}
    return {(namespace or "default", name): json.dumps(kept, separators=(",", ":")).encode()}


def _cached_body(indexes: Mapping[str, kopf.Index[Key, Any]], key: Key) -> dict[str, Any] | None:
    stored = list(indexes["dpojob_bodies"].get(key, []))
    return json.loads(stored[-1]) if stored else None


@kopf.index("batch", "v1", "jobs", labels={LABEL_JOB: kopf.PRESENT})
def dpojob_jobs(
    name: str, labels: Mapping[str, str], namespace: str | None, body: kopf.Body, **_: Any
) -> dict[Key, Owned]:
    seen = _seen_job(name, labels, body)
    return {_owner(labels, namespace): Owned(seen, str(body.meta.uid), _controller_uid(body))}


def _seen_job(name: str, labels: Mapping[str, str], body: kopf.Body) -> ChildJob:
    """The Job as `decide` sees it; its pods are joined in from the pod index at reconcile."""
    status = body.status
    state: JobState = "Running" if status.get("active") else "Pending"
    # FailureTarget and SuccessCriteriaMet come first: the Job controller sets them as soon as
    # the outcome is known, and Failed or Complete only once every pod has terminated.
    outcome = {
        "FailureTarget": "Failed",
        "Failed": "Failed",
        "SuccessCriteriaMet": "Complete",
        "Complete": "Complete",
    }
    for condition in status.get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in outcome:
            state = outcome[condition["type"]]  # type: ignore[assignment]
    return ChildJob(
        name=name,
        component=labels.get(LABEL_COMPONENT, "train"),  # type: ignore[arg-type]
        attempt=int(labels.get(LABEL_ATTEMPT, "1")),
        suspended=bool(body.spec.get("suspend")),
        state=state,
        deleting=body.meta.get("deletionTimestamp") is not None,
        spec_digest=(body.meta.get("annotations") or {}).get(SPEC_DIGEST_ANNOTATION, ""),
    )


@kopf.index("", "v1", "pods", labels={LABEL_JOB: kopf.PRESENT})
def dpojob_pods(
    name: str, labels: Mapping[str, str], namespace: str | None, body: kopf.Body, **_: Any
) -> dict[Key, SeenPod]:
    return {_owner(labels, namespace): _seen_pod(name, labels, body)}


def _seen_pod(name: str, labels: Mapping[str, str], body: kopf.Body) -> SeenPod:
    status = body.status
    exit_code, message = None, ""
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated")
        if terminated:
            exit_code, message = terminated.get("exitCode"), terminated.get("message") or ""
            break
    disrupted = any(
        c.get("type") == "DisruptionTarget" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    phase = status.get("phase") or "Pending"
    waiting_reason, waiting_message = "", ""
    if phase == "Pending":
        waiting_reason, waiting_message = _why_waiting(status)
    index = (body.meta.get("annotations") or {}).get("batch.kubernetes.io/job-completion-index")
    return SeenPod(
        job=labels.get("batch.kubernetes.io/job-name", ""),
        state=PodState(
            name, phase, exit_code, message, disrupted, waiting_reason, waiting_message[:1000]
        ),
        rank_zero_ip=status.get("podIP") if index == "0" and phase == "Running" else None,
    )


@kopf.index(
    "networking.k8s.io",
    "v1",
    "networkpolicies",
    labels={"app.kubernetes.io/managed-by": "dpo-operator"},
)
def dpojob_network_policies(name: str, namespace: str | None, **_: Any) -> dict[str, str]:
    return {namespace or "default": name}


def _why_waiting(status: Mapping[str, Any]) -> tuple[str, str]:
    """Why a Pending pod is not running: a container's waiting reason (ImagePullBackOff,
    CreateContainerConfigError for a missing Secret, ...) or the scheduler's (a missing PVC,
    no node with room); ("", "") while it is just starting."""
    for container in [
        *(status.get("initContainerStatuses") or []),
        *(status.get("containerStatuses") or []),
    ]:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            return str(waiting["reason"]), str(waiting.get("message") or "")
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return str(condition.get("reason") or "Unschedulable"), str(
                condition.get("message") or ""
            )
    return "", ""


@kopf.index("", "v1", "configmaps", labels={LABEL_JOB: kopf.PRESENT})
def dpojob_config_maps(
    name: str, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any
) -> dict[Key, Owned]:
    digest = (body.meta.annotations or {}).get(SPEC_DIGEST_ANNOTATION, "")
    owned = Owned(name, str(body.meta.uid), _controller_uid(body), digest)
    return {_owner(labels, namespace): owned}


@kopf.index("", "v1", "services", labels={LABEL_JOB: kopf.PRESENT})
def dpojob_services(
    name: str, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any
) -> dict[Key, Owned]:
    return {_owner(labels, namespace): Owned(name, str(body.meta.uid), _controller_uid(body))}


# -- the work queue --------------------------------------------------------------------------


class WorkQueue:
    """DPOJobs to reconcile: each at most once in the queue, never by two workers at once, and
    a clock for those that are due at a time."""

    def __init__(self) -> None:
        self.ready: asyncio.Queue[Key] = asyncio.Queue()
        self.queued: set[Key] = set()
        self.busy: set[Key] = set()
        self.again: set[Key] = set()  # woken while busy: reconcile once more after
        self.due: list[tuple[float, Key]] = []  # a heap; entries not in `next_due` are stale
        self.next_due: dict[Key, float] = {}
        self.clock = asyncio.Event()

    def wake(self, key: Key) -> None:
        if key in self.busy:
            self.again.add(key)
        elif key not in self.queued:
            self.queued.add(key)
            self.ready.put_nowait(key)

    def wake_at(self, key: Key, when: float) -> None:
        """Wake `key` at `when` (monotonic), unless it is to be woken sooner already."""
        if self.next_due.get(key, float("inf")) <= when:
            return
        self.next_due[key] = when
        heapq.heappush(self.due, (when, key))
        if self.due[0] == (when, key):
            self.clock.set()  # sooner than what the clock waits for

    async def take(self) -> Key:
        key = await self.ready.get()
        self.queued.discard(key)
        self.busy.add(key)
        return key

    def done(self, key: Key) -> None:
        self.busy.discard(key)
        if key in self.again:
            self.again.discard(key)
            self.wake(key)

    async def tick(self) -> None:
        """Wake each DPOJob when its time comes."""
        while True:
            self.clock.clear()
            now = time.monotonic()
            while self.due and self.due[0][0] <= now:
                when, key = heapq.heappop(self.due)
                if self.next_due.get(key) == when:
                    del self.next_due[key]
                    self.wake(key)
            timeout = self.due[0][0] - now if self.due else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.clock.wait(), timeout)


# -- carrying out decisions --------------------------------------------------------------------


# How long a create or delete is expected to show in the watch before it is no longer assumed.
EXPECTATION_SECONDS = 120.0


@dataclass
class Expectations:
    """What this operator wrote and the watch has not brought back yet, per DPOJob (what
    controller-runtime calls expectations). A reconcile that worked from the older cache would
    do it again: create attempt 1 after deciding on attempt 2, or create a child twice."""

    status: dict[Key, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    created: dict[Key, dict[str, tuple[float, ChildJob | None]]] = field(default_factory=dict)
    deleted: dict[Key, dict[str, float]] = field(default_factory=dict)

    def wrote_status(self, key: Key, revision: int, status: dict[str, Any]) -> None:
        self.status[key] = (revision, status)

    def created_child(self, key: Key, manifest: Manifest) -> None:
        metadata = manifest["metadata"]
        child = None
        if manifest["kind"] == "Job":
            child = ChildJob(
                name=metadata["name"],
                component=metadata["labels"][LABEL_COMPONENT],
                attempt=int(metadata["labels"][LABEL_ATTEMPT]),
                suspended=bool(manifest["spec"].get("suspend")),
                state="Pending",
                spec_digest=metadata["annotations"][SPEC_DIGEST_ANNOTATION],
            )
        self.created.setdefault(key, {})[metadata["name"]] = (time.monotonic(), child)

    def deleted_job(self, key: Key, name: str) -> None:
        self.deleted.setdefault(key, {})[name] = time.monotonic()

    def foresaw(self, key: Key, plural: str, body: Mapping[str, Any], seen: object) -> bool:
        """Whether an event shows only what this operator expects: the DPOJob as its last
        status write left it, a child it created as it created it, or a pod that is only
        being created (decide reads pods that run, ended, or cannot start)."""
        if plural == PLURAL:
            mine = self.status.get(key)
            if mine is None or _revision(body) != mine[0]:
                return False
            del self.status[key]  # the cache has it now
            return True
        if isinstance(seen, SeenPod):
            # A pod that is only being created says nothing new; one that cannot start does.
            return seen.state.phase == "Pending" and not seen.state.waiting_reason
        created = self.created.get(key, {})
        if isinstance(seen, ChildJob):
            return created.get(seen.name, (0.0, None))[1] == seen
        return seen in created  # a config map or service, by name

    def forget(self, key: Key) -> None:
        for kept in (self.status, self.created, self.deleted):
            kept.pop(key, None)

    def with_status(self, key: Key, body: dict[str, Any]) -> dict[str, Any]:
        """The cached DPOJob, with the status this operator last wrote if the cache is older."""
        mine = self.status.get(key)
        if mine is None:
            return body
        revision, status = mine
        if _revision(body) >= revision:
            del self.status[key]
            return body
        # The object as the write left it: its status, and the resourceVersion the write made.
        metadata = {**body["metadata"], "resourceVersion": str(revision)}
        return {**body, "metadata": metadata, "status": status}

    def with_children(
        self, key: Key, jobs: tuple[ChildJob, ...], others: set[str]
    ) -> tuple[tuple[ChildJob, ...], set[str]]:
        """The cached Jobs and other children's names, with what was created and deleted
        since."""
        now = time.monotonic()
        seen = {job.name for job in jobs} | others
        created = self.created.get(key, {})
        for name in [
            n for n, (at, _) in created.items() if n in seen or now - at > EXPECTATION_SECONDS
        ]:
            del created[name]
        deleted = self.deleted.get(key, {})
        live = {job.name for job in jobs if not job.deleting}
        for name in [
            n for n, at in deleted.items() if n not in live or now - at > EXPECTATION_SECONDS
        ]:
            del deleted[name]
        amended = tuple(replace(j, deleting=True) if j.name in deleted else j for j in jobs)
        amended += tuple(child for _, child in created.values() if child is not None)
        return amended, seen | set(created)


class ChildRefusedError(Exception):
    """The API server will not take a child as rendered (422, an admission policy), or its name
    is taken by an object this DPOJob does not own: retrying cannot help."""


@dataclass
class KubernetesExecutor:
    """Creates, deletes and suspends a DPOJob's children and writes its status."""

    api: KubeAPI
    settings: Settings
    validated: set[tuple[str, int]] = field(default_factory=set)
    expected: Expectations = field(default_factory=Expectations)
    # Namespaces whose NetworkPolicy this operator created or is creating: the DPOJobs of a
    # burst in one namespace would otherwise each try before the watch shows the first.
    fenced: set[str] = field(default_factory=set)

    def parse(self, body: Mapping[str, Any]) -> DPOJob:
        """The DPOJob; its rules and memory plan are checked once per generation."""
        metadata = body["metadata"]
        generation = (metadata["uid"], int(metadata.get("generation") or 0))
        job = parse_dpojob(body, check_rules=generation not in self.validated)
        self.validated.add(generation)
        return job

    async def apply(self, job: DPOJob, action: Action, uids: Mapping[str, str]) -> None:
        """Carries out `action`; `uids` are the uids of the children this DPOJob owns, by name:
        a delete names the uid it means, so it can never remove an object someone else has
        since created under that name."""
        namespace = job.namespace
        key = (namespace, job.name)
        if isinstance(action, Create) and action.kind == "network-policy":
            if namespace not in self.fenced:
                self.fenced.add(namespace)
                try:
                    await self._create(
                        job, render_child(job, action.kind, 0, settings=self.settings)
                    )
                except BaseException:
                    self.fenced.discard(namespace)
                    raise
        elif isinstance(action, Create):
            manifest = render_child(job, action.kind, action.attempt, settings=self.settings)
            await self._create(job, manifest)
            self.expected.created_child(key, manifest)
        elif isinstance(action, Update):
            manifest = render_child(job, action.kind, 0, settings=self.settings)
            patch = {
                "metadata": {"annotations": manifest["metadata"]["annotations"]},
                "data": manifest["data"],
            }
            await self.api.merge_patch(manifest_path(manifest), patch)
        elif isinstance(action, Delete):
            # A Job created since the cache last looked has no uid here yet: it is ours.
            await self._delete(_job_path(namespace, action.job), uids.get(action.job))
            self.expected.deleted_job(key, action.job)
        elif isinstance(action, Suspend):
            suspend = {"spec": {"suspend": action.suspend}}
            await self.api.merge_patch(_job_path(namespace, action.job), suspend)
        elif isinstance(action, DeleteChildren):
            children = [
                *((_job_path(namespace, name), name) for name in action.jobs),
                (
                    object_path("v1", "configmaps", namespace, config_map_name(job)),
                    config_map_name(job),
                ),
                (object_path("v1", "services", namespace, service_name(job)), service_name(job)),
            ]
            for path, name in children:
                if name in uids:  # not ours, or gone already: leave it
                    await self._delete(path, uids[name])

    async def _create(self, job: DPOJob, manifest: dict[str, Any]) -> None:
        kind, metadata = manifest["kind"], manifest["metadata"]
        try:
            await self.api.create(manifest)
        except ApiError as error:
            if error.status in (400, 422):  # the API server (or an admission policy) says no
                raise ChildRefusedError(f"{kind} {metadata['name']}: {error.message}") from error
            if error.status != 409:
                raise
            if kind == "NetworkPolicy":
                return  # one per namespace, shared: another DPOJob created it first
            # Already there: the cache lagged behind an earlier create of ours, or it is
            # somebody else's. Only a conflict costs this one read.
            existing = await self.api.read(manifest)
            owner = _controller_uid(kopf.Body(cast(kopf.RawBody, existing)))
            if owner != job.metadata.uid:
                raise ChildRefusedError(
                    f"a {kind} named {metadata['name']} already exists and is not this DPOJob's "
                    f"(its controller: {owner or 'none'}); delete or rename it, or rename the "
                    "DPOJob"
                ) from error
        log.info("[%s] created %s %s", metadata["namespace"], kind, metadata["name"])

    async def _delete(self, path: str, uid: str | None) -> None:
        try:
            await self.api.delete(path, uid)
        except ApiError as error:
            # Gone already, or (409) a different object by now: either way not ours to delete.
            if error.status not in (404, 409):
                raise

    async def write_status(
        self, namespace: str, name: str, status: Mapping[str, Any], decided_on: str
    ) -> int:
        """Writes status, if the DPOJob is still at resourceVersion `decided_on` (else 409:
        the status was decided from an older spec or status, and the watch brings the newer
        one); returns the resourceVersion that carries it."""
        # A merge patch: explicit nulls remove fields the state machine cleared.
        patch = {"metadata": {"resourceVersion": decided_on}, "status": status}
        path = object_path(f"{GROUP}/{VERSION}", PLURAL, namespace, name, "status")
        return _revision(await self.api.merge_patch(path, patch, decode=True))

    def scrape(self, job: DPOJob, pod_ip: str) -> TrainingMetrics | None:
        """Rank 0's latest step, loss, reward accuracy and margin; None when it cannot say.

        Rank 0 is the user's code: a page that never ends, or never stops coming, or says NaN,
        must not hang a worker, fill the operator's memory or poison the status patch."""
        url = f"http://{pod_ip}:{job.spec.monitoring.port}/metrics"
        deadline = time.monotonic() + SCRAPE_TIMEOUT
        try:
            with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as response:
                chunks: list[bytes] = []
                size = 0
                while chunk := response.read(64 * 1024):
                    size += len(chunk)
                    if size > SCRAPE_MAX_BYTES or time.monotonic() > deadline:
                        log.warning(
                            "[%s/%s] %s is over %d bytes or %.0fs; not read",
                            job.namespace,
                            job.name,
                            url,
                            SCRAPE_MAX_BYTES,
                            SCRAPE_TIMEOUT,
                        )
                        return None
                    chunks.append(chunk)
            text = b"".join(chunks).decode(errors="replace")
            families = list(text_string_to_metric_families(text))
        except (OSError, ValueError) as error:  # unreachable, or not the exposition format
            log.debug("[%s/%s] no metrics at %s: %s", job.namespace, job.name, url, error)
            return None
        values: dict[str, float] = {}
        degraded: list[HealthReason] = []
        for family in families:
            for sample in family.samples:
                if sample.labels.get("dpojob") != job.name or not math.isfinite(sample.value):
                    continue
                if sample.name == DEGRADED_METRIC:
                    reason = sample.labels.get("reason")
                    if sample.value == 1 and reason in HEALTH_REASONS:
                        degraded.append(reason)
                else:
                    values[sample.name] = sample.value
        if "dpo_train_step" not in values:
            return None
        return TrainingMetrics(
            step=int(values["dpo_train_step"]),
            loss=values.get("dpo_train_loss"),
            reward_accuracy=values.get("dpo_train_reward_accuracy"),
            reward_margin=values.get("dpo_train_reward_margin"),
            degraded=sorted(degraded, key=HEALTH_REASONS.index),
            updated_at=datetime.now(UTC),
        )


# -- one reconcile -----------------------------------------------------------------------------


async def reconcile(key: Key, memo: kopf.Memo, indexes: Mapping[str, kopf.Index[Key, Any]]) -> None:
    """Bring one DPOJob a step further, from the cache; safe to run again at any time."""
    cached = _cached_body(indexes, key)
    if cached is None:
        memo.phases.pop(key, None)
        memo.executor.expected.forget(key)
        _export_phases(memo.phases)
        return
    executor: KubernetesExecutor = memo.executor
    body = executor.expected.with_status(key, cached)
    if body["metadata"].get("deletionTimestamp"):
        return
    try:
        job = executor.parse(body)
    except ValidationError as error:
        await _refuse(executor, body, describe_errors(error), "InvalidSpec")
        return
    refused = refusals(job, executor.settings)
    if refused:
        await _refuse(executor, body, refused, "NotAllowed")
        return
    observed, uids = await _observe(job, key, indexes, executor)
    decision = decide(job, observed)
    try:
        await _carry_out(executor, job, decision, uids)
    except ChildRefusedError as refused:
        # Decided again knowing it: the run fails, saying what the API server said.
        decision = decide(job, replace(observed, refused=str(refused)))
        await _carry_out(executor, job, decision, uids)
    new = decision.status.model_dump(by_alias=True, mode="json")
    if _without_nulls(new) != (body.get("status") or {}):
        decided_on = body["metadata"]["resourceVersion"]
        revision = await executor.write_status(job.namespace, job.name, new, decided_on)
        executor.expected.wrote_status(key, revision, _without_nulls(new))
    for event in decision.events:  # only after the status write succeeded
        _post(body, event)
        log.info("[%s/%s] %s: %s", job.namespace, job.name, event.reason, event.message)
        _COUNTED.get(event.reason, lambda: None)()
    memo.phases[key] = decision.status.phase or "Pending"
    _export_phases(memo.phases)
    when = _next_due(job, decision, observed.now)
    if when is not None:
        memo.queue.wake_at(key, time.monotonic() + max(when, 0.05))


async def _carry_out(
    executor: KubernetesExecutor, job: DPOJob, decision: Decision, uids: Mapping[str, str]
) -> None:
    creates = [action for action in decision.actions if isinstance(action, Create)]
    for action in decision.actions:
        if not isinstance(action, Create):
            await executor.apply(job, action, uids)
    # A decision's creates never depend on each other (the config, the service, a Job).
    results = await asyncio.gather(
        *(executor.apply(job, c, uids) for c in creates), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def _observe(
    job: DPOJob,
    key: Key,
    indexes: Mapping[str, kopf.Index[Key, Any]],
    executor: KubernetesExecutor,
) -> tuple[Observed, dict[str, str]]:
    """What `decide` reads of `job`'s children (only those it controls), and their uids."""
    pods: list[SeenPod] = list(indexes["dpojob_pods"].get(key, []))
    uid = job.metadata.uid or ""
    owned: list[Owned] = [
        child
        for index in ("dpojob_jobs", "dpojob_config_maps", "dpojob_services")
        for child in indexes[index].get(key, [])
        if child.owner == uid
    ]
    jobs = tuple(
        replace(o.seen, pods=tuple(p.state for p in pods if p.job == o.seen.name))
        for o in owned
        if isinstance(o.seen, ChildJob)
    )
    others = {o.seen for o in owned if isinstance(o.seen, str)}
    policies: kopf.Index[str, str] = cast(Any, indexes["dpojob_network_policies"])
    fence = set(policies.get(job.namespace, []))
    if fence:
        executor.fenced.discard(job.namespace)  # the watch shows it now: believe the watch
    others |= fence
    uids = {o.seen.name if isinstance(o.seen, ChildJob) else o.seen: o.uid for o in owned}
    jobs, names = executor.expected.with_children(key, jobs, others)
    now = datetime.now(UTC)
    metrics = None
    attempt = (job.status.attempt if job.status else None) or 1
    rank_zero = next(
        (
            p.rank_zero_ip
            for p in pods
            if p.rank_zero_ip and p.job == training_job_name(job, attempt)
        ),
        None,
    )
    current = job.status.metrics if job.status else None
    if rank_zero and _scrape_due(job, now):
        metrics = await asyncio.to_thread(executor.scrape, job, rank_zero)
    config_digest = next((o.spec_digest for o in owned if o.seen == config_map_name(job)), None)
    observed = Observed(
        now=now,
        jobs=jobs,
        has_config_map=config_map_name(job) in names,
        config_spec_digest=config_digest,
        has_service=service_name(job) in names,
        has_network_policy=NETWORK_POLICY_NAME in names
        or job.namespace in executor.fenced
        or not executor.settings.network_policy,
        metrics=metrics or current,
    )
    return observed, uids


def _job_path(namespace: str, name: str) -> str:
    return object_path("batch/v1", "jobs", namespace, name)


def _revision(body: Mapping[str, Any]) -> int:
    # resourceVersion is opaque to clients in general; the kube-apiserver's is etcd's revision,
    # which only grows.
    return int(body["metadata"]["resourceVersion"])


def _scrape_due(job: DPOJob, now: datetime) -> bool:
    current = job.status.metrics if job.status else None
    if current is None or current.updated_at is None:
        return True
    elapsed = (now - current.updated_at).total_seconds()
    return elapsed >= job.spec.monitoring.interval_seconds


def _next_due(job: DPOJob, decision: Decision, now: datetime) -> float | None:
    """Seconds until time itself changes something for `job`: its next metrics scrape while it
    trains, its deadline, the end of its TTL; None when nothing is due."""
    status = decision.status
    times: list[float] = []
    if status.phase == "Training":
        times.append(float(job.spec.monitoring.interval_seconds))
    limit = job.spec.run_policy.active_deadline_seconds
    if limit is not None and status.start_time is not None and status.phase not in TERMINAL_PHASES:
        suspended = status.suspended_seconds
        if status.suspended_at is not None:
            suspended += (now - status.suspended_at).total_seconds()
        elapsed = (now - status.start_time).total_seconds() - suspended
        times.append(limit - elapsed + 0.5)
    if status.waiting_since is not None and status.phase not in TERMINAL_PHASES:
        startup = job.spec.run_policy.startup_timeout_seconds
        times.append((status.waiting_since - now).total_seconds() + startup + 0.5)
    ttl = job.spec.run_policy.ttl_seconds_after_finished
    if ttl is not None and status.completion_time is not None and not status.children_deleted:
        times.append((status.completion_time + timedelta(seconds=ttl) - now).total_seconds())
    return min(times) if times else None


_REFUSED_AS = {"InvalidSpec": "invalid spec", "NotAllowed": "not allowed here"}


async def _refuse(
    executor: KubernetesExecutor, body: dict[str, Any], problems: list[str], reason: str
) -> None:
    """A spec the operator cannot run (InvalidSpec) or may not (NotAllowed, by the admin's
    settings): say so in a SpecValid=False condition and an event, once per change of the
    spec."""
    message = "; ".join(problems)
    status = dict(body.get("status") or {})
    conditions = [c for c in status.get("conditions", []) if c.get("type") != "SpecValid"]
    if any(
        c.get("type") == "SpecValid" and c.get("message") == message
        for c in status.get("conditions", [])
    ):
        return  # already said; retrying cannot help until the spec changes
    metadata = body["metadata"]
    conditions.append(
        {
            "type": "SpecValid",
            "status": "False",
            "reason": reason,
            "message": message,
            "lastTransitionTime": datetime.now(UTC).isoformat(timespec="seconds"),
            "observedGeneration": metadata.get("generation"),
        }
    )
    patch = {
        "phase": status.get("phase") or "Pending",
        "message": f"{_REFUSED_AS[reason]}: {message}",
        "conditions": conditions,
    }
    await executor.write_status(
        metadata["namespace"], metadata["name"], patch, metadata["resourceVersion"]
    )
    _post(body, Event("Warning", reason, message))
    log.warning("[%s/%s] %s: %s", metadata["namespace"], metadata["name"], reason, message)


def _post(body: dict[str, Any], event: Event) -> None:
    """An Event on the DPOJob, posted by kopf (in the background, with its retries)."""
    owner = kopf.Body(cast(kopf.RawBody, body))
    kopf.event(owner, type=event.type, reason=event.reason, message=event.message[:1024])


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _export_phases(phases: Mapping[Key, str]) -> None:
    counts = dict.fromkeys(PHASES, 0)
    for phase in phases.values():
        counts[phase] += 1
    for phase, count in counts.items():
        DPOJOBS.labels(phase=phase).set(count)


async def _work(memo: kopf.Memo, indexes: Mapping[str, kopf.Index[Key, Any]]) -> None:
    queue: WorkQueue = memo.queue
    failures: dict[Key, int] = {}
    while True:
        key = await queue.take()
        started = time.monotonic()
        try:
            await reconcile(key, memo, indexes)
            failures.pop(key, None)
        except ApiError as error:
            RECONCILE_ERRORS.inc()
            tries = failures[key] = failures.get(key, 0) + 1
            delay = RETRY_SECONDS[min(tries, len(RETRY_SECONDS)) - 1]
            log.warning("[%s/%s] %s; again in %.0fs", *key, error, delay)
            if error.status == 403:
                _forbidden(indexes, key, error)
            queue.wake_at(key, time.monotonic() + delay)
        except Exception:
            RECONCILE_ERRORS.inc()
            log.exception("[%s/%s] reconcile failed; again in %.0fs", *key, RETRY_SECONDS[-1])
            queue.wake_at(key, time.monotonic() + RETRY_SECONDS[-1])
        finally:
            RECONCILE_SECONDS.observe(time.monotonic() - started)
            queue.done(key)


def _forbidden(indexes: Mapping[str, kopf.Index[Key, Any]], key: Key, error: ApiError) -> None:
    """RBAC is missing a verb: say which, on the DPOJob, where users look."""
    body = _cached_body(indexes, key)
    if body is not None:
        message = f"the operator may not do this: {error.message}; grant it in the operator's Role"
        _post(body, Event("Warning", "Forbidden", message))


# -- kopf ----------------------------------------------------------------------------------------


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.level = logging.WARNING  # kopf's own log lines are not Events
    settings.watching.server_timeout = 300
    # kopf keeps a worker, and the last body it saw, for each object with recent events: 5 s by
    # default. A burst of creates then holds thousands of bodies at once, and the heap never
    # shrinks back (the operator's resident memory is its high-water mark).
    settings.batching.idle_timeout = 0.5
    memo.executor = KubernetesExecutor(KubeAPI(connections=WORKERS), memo.render_settings)
    memo.queue = WorkQueue()
    memo.phases = {}
    # What decide read of each watched object at its last event, as a hash: the projection
    # itself is in the indexes already, and a hash is 28 bytes.
    memo.seen = {}
    memo.tasks = []
    libc = _glibc()
    if libc is not None:
        # Left to itself, glibc gives threads up to 8 heaps per core, and each keeps the memory
        # its thread freed: resident memory that grows with the worker threads, not the load.
        libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    # Metrics scrapes (a blocking read with a deadline) run in these threads.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="scrape")
    )


@kopf.on.login()
async def login(
    settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> kopf.ConnectionInfo | None:
    """kopf's credentials, which the operator's own requests use too: the pod's service account,
    else the Kubernetes client's login where it is installed (it runs kubeconfig exec plugins),
    else the kubeconfig's token or client certificate."""
    info = (
        kopf.login_with_service_account(settings=settings, logger=logger)
        or kopf.login_via_client(settings=settings, logger=logger)
        or kopf.login_with_kubeconfig(settings=settings, logger=logger)
    )
    if info is not None:
        await memo.executor.api.use(info)
    return info


INDEXES = (
    "dpojob_bodies",
    "dpojob_jobs",
    "dpojob_pods",
    "dpojob_config_maps",
    "dpojob_services",
    "dpojob_network_policies",
)


@kopf.on.event(GROUP, VERSION, PLURAL)
@kopf.on.event("batch", "v1", "jobs", labels={LABEL_JOB: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={LABEL_JOB: kopf.PRESENT})
@kopf.on.event("", "v1", "configmaps", labels={LABEL_JOB: kopf.PRESENT})
@kopf.on.event("", "v1", "services", labels={LABEL_JOB: kopf.PRESENT})
async def on_change(
    name: str,
    namespace: str | None,
    labels: Mapping[str, str],
    resource: kopf.Resource,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    """A DPOJob or one of its children changed (the indexes already hold the change): queue the
    DPOJob, if what the lifecycle reads of it changed. kopf runs this only once every index is
    filled, so no reconcile sees half a cache."""
    if not memo.tasks:
        # Started here, not at startup: tasks inherit this context, through which kopf posts
        # the events the workers raise. Each object's memo is kopf's shallow copy of the
        # operator's: the list is shared, so it is filled, never replaced.
        indexes = {index: kwargs[index] for index in INDEXES}
        memo.tasks.extend(asyncio.create_task(_work(memo, indexes)) for _ in range(WORKERS))
        memo.tasks.append(asyncio.create_task(memo.queue.tick()))
        memo.tasks.append(asyncio.create_task(_return_freed_memory()))
    key = (namespace or "default", name if resource.plural == PLURAL else labels[LABEL_JOB])
    watched = (resource.plural, namespace or "", name)
    if kwargs.get("type") == "DELETED":
        memo.seen.pop(watched, None)
    else:
        seen = _what_decide_reads(resource.plural, name, labels, kwargs["body"])
        news = memo.seen.get(watched) != hash(seen)  # not, e.g., the Job controller's bookkeeping
        memo.seen[watched] = hash(seen)
        # Not what this operator itself just did either: it decided knowing that.
        foreseen = memo.executor.expected.foresaw(key, resource.plural, kwargs["body"], seen)
        if foreseen or not news:
            return
    memo.queue.wake(key)


# How often freed heap memory is handed back to the system.
TRIM_SECONDS = 30.0
# glibc's mallopt parameter for the most heaps (arenas) threads may allocate from.
M_ARENA_MAX = -8
# The event loop's heap and one shared by the worker threads.
MALLOC_ARENAS = 2


def _glibc() -> Any | None:
    """glibc, to tune and trim the heap with; None where there is none (musl, macOS)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


async def _return_freed_memory() -> None:
    """A burst (a thousand DPOJobs created at once) fills the heap with watch events that are
    freed seconds later, but glibc keeps freed pages mapped, so resident memory would stay at
    the burst's peak. `malloc_trim` gives the free pages back."""
    libc = _glibc()
    if libc is None:
        return
    while True:
        await asyncio.sleep(TRIM_SECONDS)
        await asyncio.to_thread(libc.malloc_trim, 0)


def _what_decide_reads(
    plural: str, name: str, labels: Mapping[str, str], body: kopf.Body
) -> object:
    """The part of a watched object that `decide` reads, to tell news from noise."""
    if plural == PLURAL:
        # Not its status: only the operator writes that, and decided knowing what it wrote.
        meta = body.meta
        annotations = tuple(sorted(meta.annotations.items()))
        return (meta.get("generation"), annotations, meta.get("deletionTimestamp"))
    if plural == "jobs":
        return _seen_job(name, labels, body)
    if plural == "pods":
        return _seen_pod(name, labels, body)
    return name  # config maps and services: only whether they exist


@kopf.on.cleanup()
async def stop_workers(memo: kopf.Memo, **_: Any) -> None:
    for task in memo.tasks:
        task.cancel()
    await memo.executor.api.close()
