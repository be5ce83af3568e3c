"""The DPOJob controller: kopf's watch events in, `lifecycle.decide`, and the Kubernetes executor
carrying out what it decided.

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
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, cast

import kopf
from pydantic import ValidationError

from dpo_operator.api import GROUP, PLURAL, VERSION, DPOJob, DPOJobStatus, describe_errors
from dpo_operator.controller.cache import (
    ALL_NODES,
    INDEXES,
    Indexes,
    Key,
    Owned,
    SeenPod,
    cached_body,
    what_decide_reads,
)
from dpo_operator.controller.client import ApiError
from dpo_operator.controller.executor import ChildRefusedError, KubernetesExecutor, Reconciling
from dpo_operator.controller.memory import return_freed_memory
from dpo_operator.controller.metrics import (
    COUNTED_EVENTS,
    RECONCILE_ERRORS,
    RECONCILE_SECONDS,
    export_phases,
)
from dpo_operator.controller.runtime import WORKERS, Runtime, runtime_of
from dpo_operator.controller.scraper import scrape, scrape_due
from dpo_operator.core.lifecycle import (
    ChildJob,
    Create,
    Decision,
    Event,
    Observed,
    RefusalReason,
    decide,
    refuse,
)
from dpo_operator.core.names import (
    LABEL_JOB,
    NETWORK_POLICY_NAME,
    config_map_name,
    service_name,
    training_job_name,
)
from dpo_operator.core.policy import refusals
from dpo_operator.core.topology import NodeCapacity

log = logging.getLogger("dpo_operator")

# A reconcile that failed on the API is tried again after this long, then longer.
RETRY_SECONDS = (1.0, 5.0, 30.0)


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
    runtime = runtime_of(memo)
    if not runtime.tasks:
        # Started here, not at startup: tasks inherit this context, through which kopf posts
        # the events the workers raise.
        indexes = {index: kwargs[index] for index in INDEXES}
        runtime.tasks.extend(asyncio.create_task(work(runtime, indexes)) for _ in range(WORKERS))
        runtime.tasks.append(asyncio.create_task(runtime.queue.tick()))
        runtime.tasks.append(asyncio.create_task(return_freed_memory()))
    key = (namespace or "default", name if resource.plural == PLURAL else labels[LABEL_JOB])
    watched = (resource.plural, namespace or "", name)
    if kwargs.get("type") == "DELETED":
        runtime.seen.pop(watched, None)
    else:
        seen = what_decide_reads(resource.plural, name, labels, kwargs["body"])
        # Not news: e.g. the Job controller's bookkeeping.
        news = runtime.seen.get(watched) != hash(seen)
        runtime.seen[watched] = hash(seen)
        # Not what this operator itself just did either: it decided knowing that.
        expected = runtime.executor.expected
        foreseen = expected.foresaw(key, resource.plural, kwargs["body"], seen)
        if foreseen or not news:
            return
    runtime.queue.wake(key)


async def work(runtime: Runtime, indexes: Indexes) -> None:
    """One worker: takes DPOJobs off the queue and reconciles them, retrying what failed."""
    queue = runtime.queue
    failures: dict[Key, int] = {}
    while True:
        key = await queue.take()
        started = time.monotonic()
        try:
            await reconcile(key, runtime, indexes)
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


async def reconcile(key: Key, runtime: Runtime, indexes: Indexes) -> None:
    """Bring one DPOJob a step further, from the cache; safe to run again at any time."""
    executor = runtime.executor
    cached = cached_body(indexes, key)
    if cached is None:
        runtime.phases.pop(key, None)
        executor.expected.forget(key)
        export_phases(runtime.phases)
        return
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
    # Children are rendered from the status just decided: it holds the initializer's count.
    context = executor.resolve(job.model_copy(update={"status": decision.status}), uids)
    try:
        await _carry_out(executor, context, decision)
    except ChildRefusedError as refused_child:
        # Decided again knowing it: the run fails, saying what the API server said.
        decision = decide(job, replace(observed, refused=str(refused_child)))
        await _carry_out(executor, context, decision)
    new = decision.status.model_dump(by_alias=True, mode="json")
    if _without_nulls(new) != (body.get("status") or {}):
        decided_on = body["metadata"]["resourceVersion"]
        revision = await executor.write_status(job.namespace, job.name, new, decided_on)
        executor.expected.wrote_status(key, revision, _without_nulls(new))
    for event in decision.events:  # only after the status write succeeded
        post_event(body, event)
        log.info("[%s/%s] %s: %s", job.namespace, job.name, event.reason, event.message)
        COUNTED_EVENTS.get(event.reason, lambda: None)()
    runtime.phases[key] = decision.status.phase or "Pending"
    export_phases(runtime.phases)
    if decision.requeue_after is not None:
        runtime.queue.wake_at(key, time.monotonic() + max(decision.requeue_after, 0.05))


async def _carry_out(
    executor: KubernetesExecutor, context: Reconciling, decision: Decision
) -> None:
    creates = [action for action in decision.actions if isinstance(action, Create)]
    for action in decision.actions:
        if not isinstance(action, Create):
            await action.carry_out(executor, context)
    # A decision's creates never depend on each other (the config, the service, a Job).
    results = await asyncio.gather(
        *(create.carry_out(executor, context) for create in creates), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def _observe(
    job: DPOJob,
    key: Key,
    indexes: Indexes,
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
    fabric = None
    if rank_zero and scrape_due(job, now):
        metrics, fabric = await asyncio.to_thread(scrape, job, rank_zero)
    config_digest = next((o.spec_digest for o in owned if o.seen == config_map_name(job)), None)
    scheduling = job.spec.scheduling
    # Read only where a first training Job would be created in one topology domain.
    nodes = None
    if scheduling.topology_policy == "Required" and not any(j.component == "train" for j in jobs):
        node_index: kopf.Index[str, NodeCapacity] = cast(Any, indexes["cluster_nodes"])
        nodes = tuple(node_index.get(ALL_NODES, ()))
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
        fabric=fabric,
        nodes=nodes,
    )
    return observed, uids


async def _refuse(
    executor: KubernetesExecutor, body: dict[str, Any], problems: list[str], reason: RefusalReason
) -> None:
    """Write what `lifecycle.refuse` decided: phase, message and conditions only."""
    metadata = body["metadata"]
    try:
        status = DPOJobStatus.model_validate(body.get("status") or {})
    except ValidationError:
        status = DPOJobStatus()
    decision = refuse(status, metadata.get("generation"), problems, reason, datetime.now(UTC))
    if decision is None:
        return  # already said; retrying cannot help until the spec changes
    written = decision.status.model_dump(by_alias=True, mode="json", exclude_none=True)
    patch = {key: written[key] for key in ("phase", "message", "conditions")}
    await executor.write_status(
        metadata["namespace"], metadata["name"], patch, metadata["resourceVersion"]
    )
    for event in decision.events:
        post_event(body, event)
        log.warning(
            "[%s/%s] %s: %s", metadata["namespace"], metadata["name"], reason, event.message
        )


def post_event(body: dict[str, Any], event: Event) -> None:
    """An Event on the DPOJob (or DPOSweep), posted by kopf (in the background, with its
    retries)."""
    owner = kopf.Body(cast(kopf.RawBody, body))
    kopf.event(owner, type=event.type, reason=event.reason, message=event.message[:1024])


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _forbidden(indexes: Indexes, key: Key, error: ApiError) -> None:
    """RBAC is missing a verb: say which, on the DPOJob, where users look."""
    body = cached_body(indexes, key)
    if body is not None:
        message = f"the operator may not do this: {error.message}; grant it in the operator's Role"
        post_event(body, Event("Warning", "Forbidden", message))
