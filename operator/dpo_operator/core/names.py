"""The names and labels of a DPOJob's children: what the lifecycle, both executors and the
renderers agree on.
"""

from __future__ import annotations

import uuid

from dpo_operator.api import API_VERSION, DPOJob

LABEL_JOB = "dpo.dev/job-name"
LABEL_ATTEMPT = "dpo.dev/attempt"
LABEL_COMPONENT = "app.kubernetes.io/component"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def config_map_name(job: DPOJob) -> str:
    return f"{job.name}-config"


def service_name(job: DPOJob) -> str:
    return f"{job.name}-nodes"


def init_job_name(job: DPOJob) -> str:
    """The model initializer's Job: one per run, before the first training attempt."""
    return f"{job.name}-init"


def training_job_name(job: DPOJob, attempt: int) -> str:
    return f"{job.name}-train-{attempt}"


def eval_job_name(job: DPOJob, attempt: int) -> str:
    return f"{job.name}-eval-{attempt}"


def promote_job_name(job: DPOJob, attempt: int) -> str:
    return f"{job.name}-promote-{attempt}"


def master_address(job: DPOJob, attempt: int) -> str:
    """Rank 0's stable DNS name: Indexed Job pods get `<job>-<index>` under the subdomain."""
    return f"{training_job_name(job, attempt)}-0.{service_name(job)}"


def run_id(job: DPOJob) -> str:
    """The DPOJob's uid; a stable stand-in when rendering a manifest that was never applied."""
    return job.metadata.uid or str(
        uuid.uuid5(uuid.NAMESPACE_URL, f"dpo.dev/{job.namespace}/{job.name}")
    )


def controller_reference(kind: str, name: str, uid: str) -> dict[str, object]:
    """An ownerReference that makes the object named `kind`/`name` its controller: deleting
    the owner deletes it, and nothing else adopts it."""
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(job: DPOJob, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "dpojob",
        "app.kubernetes.io/instance": job.name,
        LABEL_COMPONENT: component,
        "app.kubernetes.io/part-of": "dpo-operator",
        "app.kubernetes.io/managed-by": "dpo-operator",
        LABEL_JOB: job.name,
    }


NETWORK_POLICY_NAME = "dpo-trainers"
