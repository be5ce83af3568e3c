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


class SweepScenario:
    """One DPOSweep (named `sweep`, over dpo.beta, on the quickstart's template) in its own
    namespace, and what the test does as kubelet for its trials and chooser."""

    def __init__(
        self,
        plane: ControlPlane,
        kubelet: Kubelet,
        namespace: str,
        betas: tuple[float, ...] = (0.05, 0.1, 0.3),
        max_parallel: int = 2,
        **spec: Any,
    ) -> None:
        self.plane, self.kubelet, self.namespace = plane, kubelet, namespace
        template = set_fields(example_manifest("quickstart"), **spec)["spec"]
        self.manifest = {
            "apiVersion": "dpo.dev/v1alpha1",
            "kind": "DPOSweep",
            "metadata": {"name": "sweep", "namespace": namespace},
            "spec": {
                "template": template,
                "parameters": [{"field": "dpo.beta", "values": list(betas)}],
                "maxParallel": max_parallel,
            },
        }
        plane.kubectl("create", "namespace", namespace)
        plane.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(self.manifest))

    def status(self) -> dict[str, Any]:
        found = yaml.safe_load(
            self.plane.kubectl(
                "get", "dposweep", "sweep", "-n", self.namespace, "-o", "yaml"
            ).stdout
        )
        return found.get("status") or {}  # type: ignore[no-any-return]

    def wait_phase(self, phase: str, timeout: float = 60) -> dict[str, Any]:
        return wait_for(  # type: ignore[no-any-return]
            f"{self.namespace} sweep {phase}",
            lambda: (s := self.status()).get("phase") == phase and s,
            timeout,
        )

    def trials(self) -> dict[str, str]:
        """The trial DPOJobs that exist, name -> uid."""
        listed = json.loads(
            self.plane.kubectl(
                "get", "dpo", "-n", self.namespace, "-l", "dpo.dev/sweep=sweep", "-o", "json"
            ).stdout
        )
        return {i["metadata"]["name"]: i["metadata"]["uid"] for i in listed["items"]}

    def trial_phase(self, number: int) -> str | None:
        found = yaml.safe_load(
            self.plane.kubectl(
                "get", "dpo", f"sweep-{number}", "-n", self.namespace, "-o", "yaml"
            ).stdout
        )
        return (found.get("status") or {}).get("phase")  # type: ignore[no-any-return]

    def wait_trial_phase(self, number: int, phase: str, timeout: float = 60) -> None:
        wait_for(f"trial {number} {phase}", lambda: self.trial_phase(number) == phase, timeout)

    def pod(self, name: str) -> Any:
        (pod,) = self.kubelet.wait_for_pods(self.namespace, f"sweep-{name}", 1)
        return pod

    def gate(self, number: int, verdict: str) -> None:
        """Trial `number` trains, then its gate ends with `verdict` (a termination message)."""
        self.kubelet.succeeded(self.pod(f"{number}-train-1"))
        code = 0 if '"verdict":"Passed"' in verdict else 3
        self.kubelet.terminated(self.pod(f"{number}-eval-1"), code, verdict)

    def jobs(self) -> list[str]:
        return sorted(
            j.metadata.name for j in self.plane.batch().list_namespaced_job(self.namespace).items
        )

    def events(self, kind: str = "DPOSweep") -> list[str]:
        return [
            e.reason
            for e in self.plane.core().list_namespaced_event(self.namespace).items
            if e.involved_object.kind == kind
        ]
