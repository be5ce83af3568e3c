"""kopf wiring: every DPOJob event, child Job/Pod event and timer tick runs the same reconcile.

The reconcile reads the DPOJob and its children, asks `lifecycle.reconcile` what to do, applies
the actions, writes status once (merge patch on /status), and posts Events only after that write
succeeded. All Kubernetes I/O of the operator is in this module.

kopf keeps its own progress and diff-base in `dpo.dev/*` annotations, never in status: the
status schema is strict and the API server would prune anything it does not declare.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client import ApiException
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from dpo_operator.api import API_VERSION as DPOJOB_API_VERSION
from dpo_operator.api import (
    GROUP,
    KIND,
    PHASES,
    PLURAL,
    VERSION,
    DPOJob,
    TrainingMetrics,
    describe_errors,
)
from dpo_operator.lifecycle import (
    ChildJob,
    Create,
    Decision,
    Delete,
    DeleteChildren,
    Event,
    Observed,
    Outcome,
    PodState,
    Suspend,
    reconcile,
)
from dpo_operator.render import (
    LABEL_ATTEMPT,
    LABEL_COMPONENT,
    LABEL_JOB,
    config_map_name,
    render_config_map,
    render_eval_job,
    render_promote_job,
    render_service,
    render_training_job,
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
API_REQUESTS = Counter(
    "dpo_operator_api_requests_total", "Kubernetes API requests made by reconciles", ["method"]
)

# Events that also move an operator counter.
_COUNTED = {
    "Restarting": lambda: RESTARTS.inc(),
    "GatePassed": lambda: GATE_VERDICTS.labels(verdict="Passed").inc(),
    "GateRejected": lambda: GATE_VERDICTS.labels(verdict="Rejected").inc(),
    "Promoted": lambda: PROMOTIONS.inc(),
}
TIMER_INTERVAL = 15.0
# The trainer image for DPOJobs that set none (the chart sets it to its own release).
ENV_TRAINER_IMAGE = "DPO_TRAINER_IMAGE"
SCRAPE_TIMEOUT = 3.0


class Reconciler:
    """Reads the cluster, runs the state machine, writes back. One instance per operator."""

    def __init__(self, api: client.ApiClient) -> None:
        call_api = api.call_api

        def counted_call_api(*args: Any, **kwargs: Any) -> Any:
            API_REQUESTS.labels(
                method=str(args[1] if len(args) > 1 else kwargs.get("method"))
            ).inc()
            return call_api(*args, **kwargs)

        api.call_api = counted_call_api  # type: ignore[method-assign]
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self._locks: dict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._phases: dict[tuple[str, str], str] = {}

    def reconcile(self, namespace: str, name: str) -> None:
        """Bring one DPOJob a step further; safe to call again at any time."""
        with self._locks[(namespace, name)], RECONCILE_SECONDS.time():
            try:
                self._reconcile(namespace, name)
            except ApiException as error:
                RECONCILE_ERRORS.inc()
                if error.status == 403:
                    self._report_forbidden(namespace, name, error)
                    raise kopf.TemporaryError("forbidden", delay=30) from error
                if error.status in (409, 429) or error.status >= 500:
                    raise kopf.TemporaryError(f"{error.status} {error.reason}", delay=2) from error
                raise

    def _report_forbidden(self, namespace: str, name: str, error: ApiException) -> None:
        """RBAC is missing a verb: say which, on the DPOJob, where users look."""
        detail = _api_message(error)
        message = f"the operator may not do this: {detail}; grant it in the operator's Role"
        log.error("[%s/%s] %s", namespace, name, message)
        raw = {"metadata": {"name": name, "namespace": namespace}}
        self._post_event(raw, Event("Warning", "Forbidden", message))

    def _reconcile(self, namespace: str, name: str) -> None:
        try:
            raw: dict[str, Any] = self.custom.get_namespaced_custom_object(  # type: ignore[assignment]
                GROUP, VERSION, namespace, PLURAL, name
            )
        except ApiException as error:
            if error.status == 404:
                self._phases.pop((namespace, name), None)
                self._export_phases()
                return
            raise
        if raw["metadata"].get("deletionTimestamp"):
            return
        try:
            job = DPOJob.model_validate(raw)
        except ValidationError as error:
            self._mark_invalid(raw, describe_errors(error))
            return
        observed = self.observe(job)
        decision = reconcile(job, observed)
        for action in decision.actions:
            self.apply(job, action)
        self._write_status(job, raw, decision)

    # -- observe -----------------------------------------------------------------------------

    def observe(self, job: DPOJob) -> Observed:
        namespace, selector = job.namespace, f"{LABEL_JOB}={job.name}"
        pods_by_job: dict[str, list[PodState]] = defaultdict(list)
        rank_zero_ip: dict[str, str] = {}
        pods: list[Any] = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        for pod in pods:
            owner = (pod.metadata.labels or {}).get("batch.kubernetes.io/job-name", "")
            pods_by_job[owner].append(_pod_state(pod))
            index = (pod.metadata.annotations or {}).get("batch.kubernetes.io/job-completion-index")
            if index == "0" and pod.status and pod.status.pod_ip and pod.status.phase == "Running":
                rank_zero_ip[owner] = pod.status.pod_ip
        jobs = []
        items: list[Any] = self.batch.list_namespaced_job(namespace, label_selector=selector).items
        for item in items:
            labels = item.metadata.labels or {}
            jobs.append(
                ChildJob(
                    name=item.metadata.name,
                    component=labels.get(LABEL_COMPONENT, "train"),
                    attempt=int(labels.get(LABEL_ATTEMPT, "1")),
                    suspended=bool(item.spec.suspend),
                    outcome=_outcome(item),
                    deleting=item.metadata.deletion_timestamp is not None,
                    pods=tuple(pods_by_job.get(item.metadata.name, [])),
                )
            )
        attempt = (job.status.attempt if job.status else None) or 1
        training_job = training_job_name(job, attempt)
        return Observed(
            now=datetime.now(UTC),
            jobs=tuple(jobs),
            has_config_map=self._exists(
                self.core.read_namespaced_config_map, config_map_name(job), namespace
            ),
            has_service=self._exists(
                self.core.read_namespaced_service, service_name(job), namespace
            ),
            metrics=self._scrape(job, rank_zero_ip.get(training_job)),
        )

    @staticmethod
    def _exists(read: Any, name: str, namespace: str) -> bool:
        try:
            read(name, namespace)
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    def _scrape(self, job: DPOJob, pod_ip: str | None) -> TrainingMetrics | None:
        """Rank 0's latest step, loss, reward accuracy and margin, every metricsInterval."""
        if pod_ip is None:
            return None
        current = job.status.metrics if job.status else None
        now = datetime.now(UTC)
        interval = job.spec.monitoring.interval_seconds
        if current and current.updated_at and (now - current.updated_at).total_seconds() < interval:
            return current
        url = f"http://{pod_ip}:{job.spec.monitoring.port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as response:
                text = response.read().decode()
        except OSError as error:
            log.debug("[%s/%s] no metrics at %s: %s", job.namespace, job.name, url, error)
            return current
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("dpojob") == job.name:
                    values[sample.name] = sample.value
        if "dpo_train_step" not in values:
            return current
        return TrainingMetrics(
            step=int(values["dpo_train_step"]),
            loss=values.get("dpo_train_loss"),
            reward_accuracy=values.get("dpo_train_reward_accuracy"),
            reward_margin=values.get("dpo_train_reward_margin"),
            updated_at=now,
        )

    # -- act ---------------------------------------------------------------------------------

    def apply(self, job: DPOJob, action: Any) -> None:
        namespace = job.namespace
        if isinstance(action, Create):
            self._create(job, action)
        elif isinstance(action, Delete):
            self._delete_job(action.job, namespace)
        elif isinstance(action, Suspend):
            self.batch.patch_namespaced_job(
                action.job, namespace, {"spec": {"suspend": action.suspend}}
            )
        elif isinstance(action, DeleteChildren):
            selector = f"{LABEL_JOB}={job.name}"
            children: list[Any] = self.batch.list_namespaced_job(
                namespace, label_selector=selector
            ).items
            for item in children:
                self._delete_job(item.metadata.name, namespace)
            for delete, name in (
                (self.core.delete_namespaced_config_map, config_map_name(job)),
                (self.core.delete_namespaced_service, service_name(job)),
            ):
                try:
                    delete(name, namespace)
                except ApiException as error:
                    if error.status != 404:
                        raise

    def _create(self, job: DPOJob, action: Create) -> None:
        trainer_image = os.environ.get(ENV_TRAINER_IMAGE)
        if job.spec.image is None and trainer_image:
            job = job.model_copy(
                update={"spec": job.spec.model_copy(update={"image": trainer_image})}
            )
        renderers = {
            "config": lambda: render_config_map(job),
            "service": lambda: render_service(job),
            "train": lambda: render_training_job(job, action.attempt),
            "eval": lambda: render_eval_job(job, action.attempt),
            "promote": lambda: render_promote_job(job, action.attempt),
        }
        manifest = renderers[action.kind]()
        create: Any = {
            "ConfigMap": self.core.create_namespaced_config_map,
            "Service": self.core.create_namespaced_service,
            "Job": self.batch.create_namespaced_job,
        }[manifest["kind"]]
        try:
            create(job.namespace, manifest)
            log.info(
                "[%s/%s] created %s %s",
                job.namespace,
                job.name,
                manifest["kind"],
                manifest["metadata"]["name"],
            )
        except ApiException as error:
            if error.status != 409:
                raise
            self._adopt(manifest)  # it exists already: adopt it, never duplicate it

    def _adopt(self, manifest: dict[str, Any]) -> None:
        patch = {"metadata": {"ownerReferences": manifest["metadata"].get("ownerReferences", [])}}
        name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
        patcher: Any = {
            "ConfigMap": self.core.patch_namespaced_config_map,
            "Service": self.core.patch_namespaced_service,
            "Job": self.batch.patch_namespaced_job,
        }[manifest["kind"]]
        patcher(name, namespace, patch)

    def _delete_job(self, name: str, namespace: str) -> None:
        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        except ApiException as error:
            if error.status != 404:
                raise

    # -- write back ----------------------------------------------------------------------------

    def _write_status(self, job: DPOJob, raw: dict[str, Any], decision: Decision) -> None:
        status = decision.status
        new = status.model_dump(by_alias=True, mode="json")
        if _without_nulls(new) != (raw.get("status") or {}):
            # A merge patch: explicit nulls remove fields the state machine cleared.
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, job.namespace, PLURAL, job.name, {"status": new}
            )
        for event in decision.events:  # only after the status write succeeded
            self._post_event(raw, event)
            _COUNTED.get(event.reason, lambda: None)()
        self._phases[(job.namespace, job.name)] = status.phase or "Pending"
        self._export_phases()

    def _mark_invalid(self, raw: dict[str, Any], problems: list[str]) -> None:
        message = "; ".join(problems)
        metadata = raw["metadata"]
        status = dict(raw.get("status") or {})
        conditions = [c for c in status.get("conditions", []) if c.get("type") != "SpecValid"]
        if any(
            c.get("type") == "SpecValid" and c.get("message") == message
            for c in status.get("conditions", [])
        ):
            return  # already reported; retrying cannot help until the spec changes
        conditions.append(
            {
                "type": "SpecValid",
                "status": "False",
                "reason": "InvalidSpec",
                "message": message,
                "lastTransitionTime": datetime.now(UTC).isoformat(timespec="seconds"),
                "observedGeneration": metadata.get("generation"),
            }
        )
        patch = {
            "status": {
                "phase": status.get("phase") or "Pending",
                "message": f"invalid spec: {message}",
                "conditions": conditions,
            }
        }
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, metadata["namespace"], PLURAL, metadata["name"], patch
        )
        self._post_event(raw, Event("Warning", "InvalidSpec", message))
        log.warning("[%s/%s] invalid spec: %s", metadata["namespace"], metadata["name"], message)

    def _post_event(self, raw: dict[str, Any], event: Event) -> None:
        metadata = raw["metadata"]
        now = datetime.now(UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                generate_name=f"{metadata['name']}.", namespace=metadata["namespace"]
            ),
            involved_object=client.V1ObjectReference(
                api_version=DPOJOB_API_VERSION,
                kind=KIND,
                name=metadata["name"],
                namespace=metadata["namespace"],
                uid=metadata.get("uid"),
            ),
            reason=event.reason,
            message=event.message[:1024],
            type=event.type,
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            source=client.V1EventSource(component="dpo-operator"),
            reporting_component="dpo.dev/operator",
            reporting_instance="dpo-operator",
        )
        try:
            self.core.create_namespaced_event(metadata["namespace"], body)
        except ApiException as error:  # an event is never worth failing a reconcile for
            log.warning("could not post event %s: %s", event.reason, error.reason)
        log.info(
            "[%s/%s] %s: %s", metadata["namespace"], metadata["name"], event.reason, event.message
        )

    def _export_phases(self) -> None:
        counts: dict[str, int] = defaultdict(int)
        for phase in self._phases.values():
            counts[phase] += 1
        for phase in PHASES:
            DPOJOBS.labels(phase=phase).set(counts.get(phase, 0))


def _api_message(error: ApiException) -> str:
    try:
        return str(json.loads(error.body or "")["message"])
    except (TypeError, ValueError, KeyError):
        return f"{error.status} {error.reason}"


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _outcome(item: Any) -> Outcome:
    for condition in (item.status.conditions or []) if item.status else []:
        if condition.status == "True" and condition.type in ("Complete", "Failed"):
            return "Complete" if condition.type == "Complete" else "Failed"
    active = (item.status.active or 0) if item.status else 0
    return "Running" if active else "Pending"


def _pod_state(pod: Any) -> PodState:
    status = pod.status or client.V1PodStatus()
    exit_code, message = None, ""
    for container in status.container_statuses or []:
        terminated = container.state.terminated if container.state else None
        if terminated is not None:
            exit_code, message = terminated.exit_code, terminated.message or ""
            break
    disrupted = any(
        c.type == "DisruptionTarget" and c.status == "True" for c in status.conditions or []
    )
    return PodState(pod.metadata.name, status.phase or "Pending", exit_code, message, disrupted)


# -- kopf ----------------------------------------------------------------------------------------

_reconciler: Reconciler | None = None


def _get_reconciler() -> Reconciler:
    global _reconciler
    if _reconciler is None:
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config()  # type: ignore[no-untyped-call]
        _reconciler = Reconciler(client.ApiClient())
    return _reconciler


async def _reconcile(namespace: str, name: str) -> None:
    started = time.monotonic()
    await asyncio.to_thread(_get_reconciler().reconcile, namespace, name)
    log.debug("[%s/%s] reconciled in %.3fs", namespace, name, time.monotonic() - started)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    _get_reconciler()


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def on_dpojob(name: str, namespace: str | None, **_: Any) -> None:
    await _reconcile(namespace or "default", name)


@kopf.timer(GROUP, VERSION, PLURAL, interval=TIMER_INTERVAL, initial_delay=TIMER_INTERVAL)
async def on_timer(name: str, namespace: str | None, **_: Any) -> None:
    await _reconcile(namespace or "default", name)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_JOB: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={LABEL_JOB: kopf.PRESENT})
async def on_child(labels: Mapping[str, str], namespace: str | None, **_: Any) -> None:
    namespace = namespace or "default"
    try:
        await _reconcile(namespace, labels[LABEL_JOB])
    except kopf.TemporaryError as error:  # event handlers are not retried; the timer will be
        log.info("[%s/%s] will retry: %s", namespace, labels[LABEL_JOB], error)
