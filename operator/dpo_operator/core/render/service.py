"""The headless Service that gives each training pod a DNS name for the rendezvous."""

from __future__ import annotations

from dpo_contract.pod import DEFAULT_MASTER_PORT

from dpo_operator.core.names import LABEL_COMPONENT, LABEL_JOB, service_name
from dpo_operator.core.render.manifest import Manifest
from dpo_operator.core.render.pod import object_metadata
from dpo_operator.core.resolve import ResolvedJob


def render_service(resolved: ResolvedJob) -> Manifest:
    """Headless Service giving each training pod a DNS name, published before it is Ready."""
    job = resolved.job
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_metadata(job, service_name(job), "rendezvous"),
        "spec": {
            "clusterIP": "None",
            # Rank 0 must resolve while every rank is still starting up, long before Ready.
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: job.name, LABEL_COMPONENT: "train"},
            "ports": [
                {"name": "rendezvous", "port": DEFAULT_MASTER_PORT, "protocol": "TCP"},
                {"name": "metrics", "port": job.spec.monitoring.port, "protocol": "TCP"},
            ],
        },
    }
