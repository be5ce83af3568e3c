"""What every child pod shares: metadata and owner, the user's env, resources, volumes, the
restricted security context, the pod spec and the batch Job around it.
"""

from __future__ import annotations

import json

from dpo_contract.pod import CONFIG_DIR, ENV_JOB, ENV_NAMESPACE, TRAINER_CONFIG_PATH

from dpo_operator.api import KIND, SPEC_DIGEST_ANNOTATION, DPOJob, spec_digest
from dpo_operator.core.names import (
    KUEUE_QUEUE_LABEL,
    LABEL_ATTEMPT,
    config_map_name,
    controller_reference,
    labels,
)
from dpo_operator.core.network import NetworkPieces
from dpo_operator.core.render.manifest import Manifest
from dpo_operator.core.resolve import ResolvedJob
from dpo_operator.core.storage import PVC_MOUNT_ROOT

COMPLETION_INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
RUN_AS_USER = 1000
TRAINER_CONTAINER = "trainer"


def object_metadata(job: DPOJob, name: str, component: str, **extra_labels: str) -> Manifest:
    metadata: Manifest = {
        "name": name,
        "namespace": job.namespace,
        "labels": {**labels(job, component), **extra_labels},
        "annotations": {SPEC_DIGEST_ANNOTATION: spec_digest(job.spec)},
    }
    if job.metadata.uid:
        metadata["ownerReferences"] = [controller_reference(KIND, job.name, job.metadata.uid)]
    return metadata


def user_env(job: DPOJob) -> list[Manifest]:
    spec = job.spec
    env: list[Manifest] = [{"name": e.name, "value": e.value} for e in spec.env]
    env += [
        {
            "name": s.name,
            "valueFrom": {
                "secretKeyRef": {"name": s.secret_key_ref.name, "key": s.secret_key_ref.key}
            },
        }
        for s in spec.secrets
    ]
    return env


def container_resources(
    gpus: int,
    gpu_resource: str,
    cpu: str | int | None,
    memory: str | int | None,
    disk: str | None,
    extra: dict[str, str],
) -> Manifest:
    requests: dict[str, str] = {"ephemeral-storage": disk} if disk else {}
    limits: dict[str, str] = dict(extra)
    if gpus:
        limits[gpu_resource] = str(gpus)
    if cpu is not None:
        requests["cpu"] = str(cpu)
    if memory is not None:
        requests["memory"] = limits["memory"] = str(memory)
    resources: Manifest = {}
    if requests:
        resources["requests"] = requests
    if limits:
        # Extended resources (GPUs, RDMA devices) are requested through their limit.
        resources["limits"] = limits
    return resources


def volumes_and_mounts(
    resolved: ResolvedJob, pieces: NetworkPieces | None, disk: str
) -> tuple[list[Manifest], list[Manifest]]:
    """The pod's volumes: its config, a /tmp of `disk` (downloads, staged checkpoints), the
    claims its URIs name, and with `pieces` /dev/shm and the network's own."""
    job = resolved.job
    volumes: list[Manifest] = [
        {"name": "dpo-config", "configMap": {"name": config_map_name(job)}},
        {"name": "tmp", "emptyDir": {"sizeLimit": disk}},
    ]
    mounts: list[Manifest] = [
        {"name": "dpo-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    for claim in resolved.claims:
        volumes.append({"name": f"pvc-{claim}"[:63], "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": f"pvc-{claim}"[:63], "mountPath": f"{PVC_MOUNT_ROOT}/{claim}"})
    if pieces is not None:
        volumes.append(
            {
                "name": "dshm",
                "emptyDir": {"medium": "Memory", "sizeLimit": str(job.spec.resources.shm_size)},
            }
        )
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes += pieces.volumes
        mounts += pieces.trainer_mounts
    return volumes, mounts


def container_security(capabilities: tuple[str, ...]) -> Manifest:
    caps: Manifest = {"drop": ["ALL"]}
    if capabilities:
        caps["add"] = list(capabilities)
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "allowPrivilegeEscalation": False,
        "capabilities": caps,
    }


def pod_spec(
    job: DPOJob, container: Manifest, volumes: list[Manifest], *, restart_policy: str = "Never"
) -> Manifest:
    scheduling = job.spec.scheduling
    pod: Manifest = {
        "restartPolicy": restart_policy,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if scheduling.priority_class_name:
        pod["priorityClassName"] = scheduling.priority_class_name
    if scheduling.node_selector:
        pod["nodeSelector"] = dict(scheduling.node_selector)
    if scheduling.tolerations:
        pod["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in scheduling.tolerations
        ]
    if scheduling.affinity:
        pod["affinity"] = json.loads(json.dumps(scheduling.affinity))
    return pod


def batch_job(
    job: DPOJob,
    name: str,
    component: str,
    attempt: int,
    pod: Manifest,
    *,
    pod_annotations: dict[str, str] | None = None,
    suspend: bool,
    spec_extra: Manifest,
) -> Manifest:
    attempt_label = {LABEL_ATTEMPT: str(attempt)}
    metadata = object_metadata(job, name, component, **attempt_label)
    queue = job.spec.scheduling.queue_name
    # Kueue admits what holds GPUs: training and the gate, never a CPU-only step.
    queued = bool(queue) and component not in ("init", "promote", "choose")
    if queued:
        metadata["labels"][KUEUE_QUEUE_LABEL] = queue
    template_metadata: Manifest = {"labels": {**labels(job, component), **attempt_label}}
    if pod_annotations:
        template_metadata["annotations"] = pod_annotations
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            **spec_extra,
            # Kueue admits a queued Job by unsuspending it.
            "suspend": suspend or queued,
            "template": {"metadata": template_metadata, "spec": pod},
        },
    }


def single_pod_job(
    resolved: ResolvedJob,
    name: str,
    component: str,
    attempt: int,
    gpus: int,
    cpu: str | int | None,
    memory: str | int | None,
    non_retryable: list[int],
) -> Manifest:
    job, spec, settings = resolved.job, resolved.spec, resolved.settings
    volumes, mounts = volumes_and_mounts(resolved, None, resolved.gate_disk)
    container: Manifest = {
        "name": component,
        "image": spec.image or settings.trainer_image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["dpo-trainer", component, "--config", TRAINER_CONFIG_PATH],
        "env": [
            {"name": ENV_JOB, "value": job.name},
            {"name": ENV_NAMESPACE, "value": job.namespace},
            *user_env(job),
        ],
        "resources": container_resources(
            gpus,
            spec.resources.gpu_resource_name,
            cpu,
            memory,
            resolved.disk_request(resolved.gate_disk),
            {},
        ),
        "volumeMounts": mounts,
        "securityContext": container_security(()),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.output.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": spec.output.credentials_secret}}]
    return batch_job(
        job,
        name,
        component,
        attempt,
        pod_spec(job, container, volumes),
        suspend=False,
        spec_extra={
            "backoffLimit": 2,
            "podFailurePolicy": {
                "rules": [
                    # Bad input, a rejected gate, a champion that changed: a retry gives the
                    # same answer.
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": component,
                            "operator": "In",
                            "values": sorted(non_retryable),  # the API wants them in order
                        },
                    },
                    # Preemption and node drains are not the pod's fault.
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    },
                ]
            },
        },
    )
