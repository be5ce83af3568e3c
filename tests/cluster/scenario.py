"""One DPOJob in its own namespace on the real control plane, and what a test does as kubelet."""

from __future__ import annotations

import json
from typing import Any

import yaml

from tests.cluster.control_plane import ControlPlane, Kubelet, wait_for
from tests.conftest import example_manifest, set_fields


class Scenario:
    """One DPOJob in its own namespace, and what the test does as kubelet."""

    def __init__(self, plane: ControlPlane, kubelet: Kubelet, namespace: str, **spec: Any) -> None:
        self.plane, self.kubelet, self.namespace = plane, kubelet, namespace
        manifest = set_fields(example_manifest("quickstart"), **spec)
        manifest["metadata"]["namespace"] = namespace
        self.manifest = manifest
        plane.kubectl("create", "namespace", namespace)
        plane.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest))

    def dpojob(self) -> dict[str, Any]:
        return yaml.safe_load(
            self.plane.kubectl(
                "get", "dpo", "quickstart", "-n", self.namespace, "-o", "yaml"
            ).stdout
        )

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.dpojob().get("status") or {}
        return status

    def wait_phase(self, phase: str, timeout: float = 60) -> dict[str, Any]:
        return wait_for(
            f"{self.namespace} phase {phase}",  # type: ignore[no-any-return]
            lambda: (s := self.status()).get("phase") == phase and s,
            timeout,
        )

    def suspend(self, suspend: bool) -> None:
        patch = json.dumps({"spec": {"runPolicy": {"suspend": suspend}}})
        self.plane.kubectl(
            "patch", "dpo", "quickstart", "-n", self.namespace, "--type=merge", "-p", patch
        )

    def pod(self, job: str) -> Any:
        (pod,) = self.kubelet.wait_for_pods(self.namespace, f"quickstart-{job}", 1)
        return pod

    def jobs(self) -> list[str]:
        return sorted(
            j.metadata.name for j in self.plane.batch().list_namespaced_job(self.namespace).items
        )

    def events(self) -> list[str]:
        return [
            e.reason
            for e in self.plane.core().list_namespaced_event(self.namespace).items
            if e.involved_object.kind == "DPOJob"
        ]
