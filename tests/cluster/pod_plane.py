"""A control plane whose pods really run, for the tiers that need it: kube-scheduler binds pods
to the Nodes a `PodRunner` serves, and the runner runs them. One per test session: a CPU node
for the trainer's own runs, and tainted GPU nodes in two topology blocks for placement (their
pods are held, never started: the trainer needs CUDA there). Registered in tests/conftest.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dpo_contract.manifest import verify_manifest
from dpo_operator.core.validate import parse_dpojob
from dpo_trainer.io.artifacts import EVAL_REPORT
from dpo_trainer.publish.pointer import CURRENT, VERSIONS

from tests.cluster.control_plane import ControlPlane, Operator, wait_for
from tests.cluster.pod_runner import NodeSpec, PodRunner
from tests.conftest import example_manifest, set_fields

TRAINING_TIMEOUT = 600  # a CPU shared with the rest of the suite
BLOCK_LABEL = "topology.dpo.dev/block"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def gpu_node(name: str, block: str, product: str = "H100") -> NodeSpec:
    return NodeSpec(
        name,
        cpu="96",
        memory="1Ti",
        extended={"nvidia.com/gpu": "8", "rdma/ib": "8"},  # a port per GPU
        labels={BLOCK_LABEL: block, GPU_PRODUCT_LABEL: product},
        taints=(GPU_TAINT,),
    )


# Pairs of CPU nodes for the fabric tests, one healthy and one degraded for real: a job selects
# a pool and asks for 3 of its 4 CPUs, so that each of its two pods gets a node of the pair.
POOL_LABEL = "dpo.dev/pool"
DEGRADED_TAINT = {"key": "dpo.dev/degraded-pool", "value": "true", "effect": "NoSchedule"}
SLOW_LINK_RATE = "20mbit"
SLOW_NODE_CPUS = 0.5


def pool_node(name: str, pool: str, **degraded: Any) -> NodeSpec:
    return NodeSpec(name, cpu="4", labels={POOL_LABEL: pool}, taints=(DEGRADED_TAINT,), **degraded)


def in_pool(pool: str) -> dict[str, Any]:
    """The spec fields that put a job's two pods on the two nodes of `pool`."""
    return {
        "resources.cpu": "3",
        "scheduling.nodeSelector": {POOL_LABEL: pool},
        "scheduling.tolerations": [
            {"key": DEGRADED_TAINT["key"], "operator": "Exists", "effect": "NoSchedule"}
        ],
    }


NODES = [
    NodeSpec("cpu-0"),
    pool_node("link-ok", "slow-link"),
    pool_node("link-slow", "slow-link", link_rate=SLOW_LINK_RATE),
    pool_node("cpu-ok", "slow-cpu"),
    pool_node("cpu-slow", "slow-cpu", cpu_quota=SLOW_NODE_CPUS),
    gpu_node("gpu-a-0", "a"),
    gpu_node("gpu-a-1", "a"),
    gpu_node("gpu-b-0", "b"),
    gpu_node("gpu-b-1", "b"),
    gpu_node("gpu-a-2", "a", product="A100"),
]


@pytest.fixture(scope="session")
def pod_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with ControlPlane.with_crd(tmp_path_factory.mktemp("pod-plane"), scheduler=True) as plane:
        yield plane


@pytest.fixture(scope="session")
def pod_runner(pod_plane: ControlPlane) -> Iterator[PodRunner]:
    runner = PodRunner(pod_plane, pod_plane.workdir / "runner", NODES).start()
    try:
        yield runner
    finally:
        runner.stop()


@pytest.fixture(scope="session")
def pod_operator(pod_plane: ControlPlane, pod_runner: PodRunner) -> Iterator[Operator]:
    running = Operator(pod_plane, log="pod-operator.log").start()
    try:
        yield running
    finally:
        running.kill()


def output_volume(plane: ControlPlane, runner: PodRunner, namespace: str, output: str) -> Path:
    """The host folder behind the claim an output `pvc://CLAIM/...` names, in `namespace`: the
    claim bound to a hostPath PersistentVolume the first time (and the namespace created)."""
    claim = output.removeprefix("pvc://").split("/")[0]
    volume = runner.workdir / "volumes" / namespace / claim
    plane.kubectl("create", "namespace", namespace, check=False)
    if not output.startswith("pvc://") or volume.exists():
        return volume
    volume.mkdir(parents=True)
    pv = f"{claim}-{namespace}"
    persistent_volume = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": pv},
        "spec": {
            "capacity": {"storage": "10Gi"},
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "",
            "hostPath": {"path": str(volume)},
            "claimRef": {"namespace": namespace, "name": claim},
        },
    }
    bound = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim, "namespace": namespace},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "",
            "volumeName": pv,
            "resources": {"requests": {"storage": "10Gi"}},
        },
    }
    for body in (persistent_volume, bound):
        plane.kubectl("apply", "-f", "-", stdin=json.dumps(body))
    return volume


class Run:
    """A DPOJob in `namespace`; an output on a claim gets the claim, bound to a hostPath
    PersistentVolume."""

    def __init__(
        self,
        plane: ControlPlane,
        runner: PodRunner,
        namespace: str,
        name: str,
        example: str = "quickstart",
        **spec: Any,
    ) -> None:
        self.plane, self.runner, self.namespace, self.name = plane, runner, namespace, name
        manifest = set_fields(example_manifest(example), **spec)
        manifest["metadata"] = {"name": name, "namespace": namespace}
        self.volume = output_volume(
            plane, runner, namespace, parse_dpojob(manifest).spec.output.uri
        )
        plane.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest))

    def status(self) -> dict[str, Any]:
        job = self.plane.custom().get_namespaced_custom_object(
            "dpo.dev", "v1alpha1", self.namespace, "dpojobs", self.name
        )
        return dict(job.get("status") or {})

    def wait_phase(self, phase: str, timeout: float = TRAINING_TIMEOUT) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            status = self.status()
            if status.get("phase") == phase:
                return status
            assert status.get("phase") not in {"Failed", "Succeeded"} - {phase}, (
                status,
                self.logs(),
            )
            return None

        return wait_for(f"{self.namespace}/{self.name} {phase}", reached, timeout)  # type: ignore[no-any-return]

    def pod(self, component: str, attempt: int = 1) -> str:
        job = f"{self.name}-{component}-{attempt}"

        def started() -> str | None:
            pods = self.plane.core().list_namespaced_pod(
                self.namespace, label_selector=f"batch.kubernetes.io/job-name={job}"
            )
            running = [p for p in pods.items if p.status.phase == "Running"]
            return running[-1].metadata.name if running else None

        return wait_for(f"a running pod of {job}", started, TRAINING_TIMEOUT)  # type: ignore[no-any-return]

    def placed(self, count: int, attempt: int = 1) -> list[str] | None:
        """The Nodes the training Job's `count` pods were bound to, once all of them were."""
        pods = self.plane.core().list_namespaced_pod(
            self.namespace,
            label_selector=f"batch.kubernetes.io/job-name={self.name}-train-{attempt}",
        )
        nodes = [p.spec.node_name for p in pods.items if p.spec.node_name]
        return sorted(nodes) if len(nodes) == count else None

    @property
    def uid(self) -> str:
        job = self.plane.custom().get_namespaced_custom_object(
            "dpo.dev", "v1alpha1", self.namespace, "dpojobs", self.name
        )
        return str(job["metadata"]["uid"])

    @property
    def artifacts(self) -> Path:
        return self.volume / self.namespace / self.name / self.uid

    def logs(self) -> str:
        return namespace_logs(self.runner, self.namespace)


def namespace_logs(runner: PodRunner, namespace: str) -> str:
    """The end of the log of every pod the runner ran in `namespace`."""
    return "\n".join(
        f"--- {p.name}\n{p.log.read_text(errors='replace')[-3000:]}"
        for p in runner.pods.values()
        if p.namespace == namespace
    )


def assert_promoted_intact(run: Run, status: dict[str, Any]) -> None:
    """The gate passed, the promoted copy is the gated adapter, every file as recorded, and
    vLLM can serve it as it is."""
    gate = json.loads((run.artifacts / EVAL_REPORT).read_text())
    target = run.volume / "promoted" / run.name
    current = json.loads((target / CURRENT).read_text())
    assert status.get("evaluation", {}).get("verdict") == "Passed", status
    assert gate["adapterDigest"] == current["digest"] == status["promotion"]["digest"]
    promoted = target / VERSIONS / current["version"]
    assert verify_manifest(promoted) == current["digest"]
    served = json.loads((promoted / "adapter_config.json").read_text())
    assert served["base_model_name_or_path"] == "builtin:tiny-llama"
    served = f"--lora-modules {current['version']}={current['uri']}"
    assert served in status["promotion"]["vllmServe"]
