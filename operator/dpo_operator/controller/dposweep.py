"""The DPOSweep controller: the sweep, its trials (DPOJobs labelled `dpo.dev/sweep`) and its
chooser pod in, `decide_sweep`, and its actions carried out: trials created, the chooser
created, the winner approved, status written.

Like the DPOJob controller it reads kopf's indexes, never GETs or LISTs, and a sweep is never
reconciled twice at once (its own work queue). A trial is the sweep's only if the sweep is its
controller (owner reference by uid): a label proves nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf
from pydantic import ValidationError

from dpo_operator.api import (
    API_VERSION,
    GROUP,
    PLURAL,
    VERSION,
    DPOJob,
    DPOJobStatus,
    TrainingMetrics,
    describe_errors,
)
from dpo_operator.api.sweep import SWEEP_KIND, SWEEP_PLURAL, DPOSweep, Rung
from dpo_operator.controller.cache import (
    Indexes,
    Key,
    cached_body,
    compact_body,
    controller_uid,
    seen_job,
    seen_pod,
)
from dpo_operator.controller.client import ApiError, object_path
from dpo_operator.controller.dpojob import RETRY_SECONDS, post_event
from dpo_operator.controller.metrics import export_sweep_trials
from dpo_operator.controller.runtime import Runtime, runtime_of
from dpo_operator.core.lifecycle import APPROVE_ANNOTATION, STOP_ANNOTATION, Event
from dpo_operator.core.lifecycle.sweep import (
    ApproveTrial,
    CreateChooser,
    CreateTrial,
    SeenChooser,
    SeenTrial,
    StopTrial,
    SweepDecision,
    SweepObserved,
    decide_sweep,
)
from dpo_operator.core.render.chooser import CHOOSER_LABEL, render_chooser
from dpo_operator.core.resolve import resolve
from dpo_operator.core.sweep import (
    SWEEP_LABEL,
    TRIAL_LABEL,
    SweepError,
    Trial,
    trials,
)
from dpo_operator.core.validate import parse_dpojob

log = logging.getLogger("dpo_operator")
SWEEP_WORKERS = 2


@dataclass(frozen=True)
class SweptTrial:
    owner: str  # the uid of the sweep that controls it
    seen: SeenTrial


@dataclass(frozen=True)
class SweptChooser:
    owner: str
    seen: SeenChooser


@kopf.index(GROUP, VERSION, SWEEP_PLURAL)
async def dposweep_bodies(
    body: kopf.Body, name: str, namespace: str | None, **_: Any
) -> dict[Key, bytes]:
    return {(namespace or "default", name): compact_body(body)}


@kopf.index(GROUP, VERSION, PLURAL, labels={SWEEP_LABEL: kopf.PRESENT})
async def sweep_trials(
    name: str, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any
) -> dict[Key, SweptTrial]:
    return {
        (namespace or "default", labels[SWEEP_LABEL]): SweptTrial(
            controller_uid(body, SWEEP_KIND), seen_trial(name, labels, body)
        )
    }


def seen_trial(name: str, labels: Mapping[str, str], body: kopf.Body) -> SeenTrial:
    try:
        status = DPOJobStatus.model_validate(body.get("status") or {})
    except ValidationError:
        status = DPOJobStatus()
    evaluation = status.evaluation
    gate = {c.name: c for c in evaluation.criteria} if evaluation else {}
    metrics = status.metrics or TrainingMetrics()
    margin, accuracy = gate.get("rewardMargin"), gate.get("rewardAccuracy")
    # The gate's held-out numbers once it scored them, else the latest evaluation's in training.
    metrics_interval = None
    if metrics.eval_reward_margin_low is not None and metrics.eval_reward_margin_high is not None:
        metrics_interval = (metrics.eval_reward_margin_low, metrics.eval_reward_margin_high)
    interval = metrics_interval
    if margin is not None and margin.low is not None and margin.high is not None:
        interval = (margin.low, margin.high)
    rung = None
    if status.phase == "Training" and metrics.eval_step is not None and metrics_interval:
        rung = Rung(step=metrics.eval_step, low=metrics_interval[0], high=metrics_interval[1])
    annotations = body.meta.annotations or {}
    return SeenTrial(
        number=int(labels.get(TRIAL_LABEL, "0")),
        name=name,
        phase=status.phase,
        reward_margin=margin.value if margin is not None else metrics.eval_reward_margin,
        reward_accuracy=accuracy.value if accuracy is not None else metrics.reward_accuracy,
        verdict=evaluation.verdict if evaluation else None,
        approved=evaluation is not None
        and evaluation.adapter_digest is not None
        and annotations.get(APPROVE_ANNOTATION) == evaluation.adapter_digest,
        adapter_digest=evaluation.adapter_digest if evaluation else None,
        interval=interval,
        rung=rung,
        stopped=annotations.get(STOP_ANNOTATION),
    )


@kopf.index("batch", "v1", "jobs", labels={CHOOSER_LABEL: kopf.PRESENT})
async def sweep_chooser_jobs(
    name: str, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any
) -> dict[Key, SweptChooser]:
    seen = SeenChooser(seen_job(name, labels, body).state)
    return {
        (namespace or "default", labels[CHOOSER_LABEL]): SweptChooser(
            controller_uid(body, SWEEP_KIND), seen
        )
    }


@kopf.index("", "v1", "pods", labels={CHOOSER_LABEL: kopf.PRESENT})
async def sweep_chooser_messages(
    name: str, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any
) -> dict[Key, str]:
    return {
        (namespace or "default", labels[CHOOSER_LABEL]): seen_pod(name, labels, body).state.message
    }


SWEEP_INDEXES = (
    "dposweep_bodies",
    "sweep_trials",
    "sweep_chooser_jobs",
    "sweep_chooser_messages",
    "dpojob_bodies",
)


@kopf.on.event(GROUP, VERSION, SWEEP_PLURAL)
@kopf.on.event(GROUP, VERSION, PLURAL, labels={SWEEP_LABEL: kopf.PRESENT})
@kopf.on.event("batch", "v1", "jobs", labels={CHOOSER_LABEL: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={CHOOSER_LABEL: kopf.PRESENT})
async def on_sweep_change(
    name: str,
    namespace: str | None,
    labels: Mapping[str, str],
    resource: kopf.Resource,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    """A sweep, a trial or the chooser changed (the indexes hold the change): queue the sweep."""
    runtime = runtime_of(memo)
    if not runtime.tasks_of_sweeps:
        indexes = {index: kwargs[index] for index in SWEEP_INDEXES}
        runtime.tasks_of_sweeps.extend(
            asyncio.create_task(work(runtime, indexes)) for _ in range(SWEEP_WORKERS)
        )
        runtime.tasks_of_sweeps.append(asyncio.create_task(runtime.sweeps.tick()))
    if resource.plural == SWEEP_PLURAL:
        sweep = name
    elif resource.plural == PLURAL:
        sweep = labels[SWEEP_LABEL]
    else:
        sweep = labels[CHOOSER_LABEL]
    runtime.sweeps.wake((namespace or "default", sweep))


async def work(runtime: Runtime, indexes: Indexes) -> None:
    queue = runtime.sweeps
    failures: dict[Key, int] = {}
    while True:
        key = await queue.take()
        try:
            await reconcile_sweep(key, runtime, indexes)
            failures.pop(key, None)
        except ApiError as error:
            tries = failures[key] = failures.get(key, 0) + 1
            delay = RETRY_SECONDS[min(tries, len(RETRY_SECONDS)) - 1]
            log.warning("[%s/%s] DPOSweep: %s; again in %.0fs", *key, error, delay)
            queue.wake_at(key, time.monotonic() + delay)
        except Exception:
            log.exception("[%s/%s] DPOSweep reconcile failed", *key)
            queue.wake_at(key, time.monotonic() + RETRY_SECONDS[-1])
        finally:
            queue.done(key)


def _cached(indexes: Indexes, index: str, key: Key) -> list[Any]:
    return list(indexes[index].get(key, []))


async def reconcile_sweep(key: Key, runtime: Runtime, indexes: Indexes) -> None:
    """Bring one DPOSweep a step further, from the cache; safe to run again at any time."""
    stored = _cached(indexes, "dposweep_bodies", key)
    if not stored:
        export_sweep_trials(runtime.sweep_series, key, [])
        runtime.sweep_trials.pop(key, None)
        return
    # The status last written, if the cache has not caught up with it: a decision on the older
    # one would be refused (409) after its actions were carried out, and its events lost.
    body = runtime.sweep_statuses.with_status(key, json.loads(stored[-1]))
    metadata = body["metadata"]
    if metadata.get("deletionTimestamp"):
        return
    executor = runtime.executor
    generation = (metadata["uid"], int(metadata.get("generation") or 0))
    try:
        sweep = DPOSweep.model_validate(body)
        validated, found = runtime.sweep_trials.get(key, (None, []))
        if validated != generation:
            found = trials(body, executor.settings.default_output)
            runtime.sweep_trials[key] = (generation, found)
    except ValidationError as error:
        await _refuse(runtime, body, describe_errors(error))
        return
    except SweepError as error:
        await _refuse(runtime, body, error.problems)
        return
    uid = metadata["uid"]
    observed = SweepObserved(
        trials={
            t.seen.number: t.seen for t in _cached(indexes, "sweep_trials", key) if t.owner == uid
        },
        chooser=next(
            (
                SeenChooser(c.seen.state, _chooser_message(indexes, key))
                for c in _cached(indexes, "sweep_chooser_jobs", key)
                if c.owner == uid
            ),
            None,
        ),
    )
    decision = decide_sweep(sweep, found, observed)
    await _carry_out(runtime, indexes, sweep, found, decision)
    # Every trial, created or not: one not created yet has no series to join with.
    series = [
        (sweep.namespace, sweep.name, str(row.number), row.name, row.settings)
        for row in decision.status.trials
    ]
    export_sweep_trials(runtime.sweep_series, key, series)
    new = decision.status.model_dump(by_alias=True, mode="json", exclude_none=True)
    if new != (body.get("status") or {}):
        revision = await runtime.executor.write_status(
            sweep.namespace, sweep.name, new, metadata["resourceVersion"], SWEEP_PLURAL
        )
        runtime.sweep_statuses.wrote_status(key, revision, new)
    for event in decision.events:
        post_event(body, event)
        log.info("[%s/%s] DPOSweep %s: %s", *key, event.reason, event.message)


def _chooser_message(indexes: Indexes, key: Key) -> str:
    """The termination message of the chooser's pod that left one (a retry's, if any)."""
    messages = [m for m in _cached(indexes, "sweep_chooser_messages", key) if m]
    return messages[-1] if messages else ""


async def _carry_out(
    runtime: Runtime,
    indexes: Indexes,
    sweep: DPOSweep,
    found: list[Trial],
    decision: SweepDecision,
) -> None:
    api = runtime.executor.api
    by_number = {trial.number: trial for trial in found}
    for action in decision.actions:
        if isinstance(action, CreateTrial):
            await _create(api, by_number[action.number].manifest)
        elif isinstance(action, ApproveTrial):
            await _annotate(api, sweep, action.name, APPROVE_ANNOTATION, action.adapter_digest)
        elif isinstance(action, StopTrial):
            # The trial's own lifecycle ends it (Stopped, its Jobs deleted, an Event saying why).
            await _annotate(api, sweep, action.name, STOP_ANNOTATION, action.reason)
        elif isinstance(action, CreateChooser):
            compared = {}
            for number in action.numbers:
                trial_body = cached_body(
                    indexes, (sweep.namespace, by_number[number].manifest["metadata"]["name"])
                )
                if trial_body is None:
                    return  # the cache has not caught up: the trial's next event wakes us
                job: DPOJob = parse_dpojob(
                    trial_body,
                    check_rules=False,
                    default_output=runtime.executor.settings.default_output,
                )
                compared[number] = resolve(job, runtime.executor.settings)
            await _create(api, render_chooser(sweep, compared))


async def _create(api: Any, manifest: dict[str, Any]) -> None:
    try:
        await api.create(manifest)
    except ApiError as error:
        if error.status != 409:  # created before the cache showed it
            raise
    log.info(
        "[%s] created %s %s",
        manifest["metadata"]["namespace"],
        manifest["kind"],
        manifest["metadata"]["name"],
    )


async def _annotate(api: Any, sweep: DPOSweep, trial: str, key: str, value: str) -> None:
    patch = {"metadata": {"annotations": {key: value}}}
    await api.merge_patch(object_path(API_VERSION, PLURAL, sweep.namespace, trial), patch)


async def _refuse(runtime: Runtime, body: dict[str, Any], problems: list[str]) -> None:
    """A sweep whose trials cannot run: Failed, naming every problem, once per generation."""
    message = "the sweep cannot run: " + "; ".join(problems)
    status = body.get("status") or {}
    if status.get("phase") == "Failed" and status.get("message") == message:
        return
    metadata = body["metadata"]
    failed = {"phase": "Failed", "message": message}
    await runtime.executor.write_status(
        metadata["namespace"], metadata["name"], failed, metadata["resourceVersion"], SWEEP_PLURAL
    )
    post_event(body, Event("Warning", "InvalidSpec", message))
