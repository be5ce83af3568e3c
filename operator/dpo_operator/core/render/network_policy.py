"""The namespace's `dpo-trainers` NetworkPolicy, shared by its DPOJobs."""

from __future__ import annotations

from dpo_operator.core.names import NETWORK_POLICY_NAME
from dpo_operator.core.render.manifest import Manifest
from dpo_operator.core.resolve import ResolvedJob


def render_network_policy(resolved: ResolvedJob) -> Manifest:
    """Fences the pods of every DPOJob in the namespace: only they reach one another
    (rendezvous, NCCL, any port), and only the operator and the admin's metrics scrapers reach
    the named `metrics` port. One per namespace, shared by its DPOJobs (so it has no owner)."""
    job, settings = resolved.job, resolved.settings
    namespaces = (settings.operator_namespace, *settings.metrics_scrapers)
    scrapers = [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}
        for name in dict.fromkeys(namespaces)
    ]
    trainers = {"matchLabels": {"app.kubernetes.io/managed-by": "dpo-operator"}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": NETWORK_POLICY_NAME,
            "namespace": job.namespace,
            "labels": {
                "app.kubernetes.io/part-of": "dpo-operator",
                "app.kubernetes.io/managed-by": "dpo-operator",
            },
        },
        "spec": {
            "podSelector": trainers,
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": trainers}]},
                {"from": scrapers, "ports": [{"protocol": "TCP", "port": "metrics"}]},
            ],
        },
    }
