"""Kueue on the pod plane: its manager, CRDs and webhooks as they ship in sigs.k8s.io/kueue (built
from the Go module proxy by tools/build-control-plane.sh), with GPU quota over the simulated GPU
Nodes and a Topology of their blocks.

Two things differ from a cluster install, both because this control plane has no Service
network: the API server calls Kueue's webhooks by URL on 127.0.0.1 instead of through its
Service, and trusts a CA made here instead of Kueue's own certificate rotation (which signs
for the Service's DNS name). The webhooks, their paths and their rules are Kueue's own; only
the batch/Job and Kueue-object ones are registered (the other frameworks' CRDs are not
installed), and the Job ones only for Jobs with a queue name, so the rest of the suite's Jobs
never wait on Kueue.
"""

from __future__ import annotations

import base64
import copy
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from dpo_operator.core.names import KUEUE_QUEUE_LABEL
from dpo_operator.local.kubelet import free_port

from tests.cluster.control_plane import KUEUE, ControlPlane, ensure_binaries
from tests.cluster.pod_plane import BLOCK_LABEL, GPU_PRODUCT_LABEL, GPU_TAINT
from tests.servers import stop, wait_until_ready

NAMESPACE = "kueue-system"
# Without its own certificate management, Kueue reads the metrics server's certificate from
# here (its Helm chart mounts a Secret there); the serving certificate made here stands in.
METRICS_CERTS = Path("/etc/kueue/metrics/certs")
HOSTNAME_LABEL = "kubernetes.io/hostname"
TOPOLOGY = "gpu-blocks"
GPU_FLAVOR = "h100"
CPU_FLAVOR = "cpu"
GPU_QUEUE = "gpus"  # ClusterQueue and LocalQueue
CPU_QUEUE = "cpus"
GPU_QUOTA = 32  # the four H100 nodes
CPU_QUOTA = "2"  # one quickstart training pod at a time
LOW_PRIORITY, HIGH_PRIORITY = "dpo-low", "dpo-high"
# The webhooks registered: Kueue's own objects, and batch/v1 Jobs (the operator's children).
WEBHOOK_PATHS = ("-batch-v1-job", "-kueue-x-k8s-io-")
START_TIMEOUT = 120


@dataclass
class Kueue:
    plane: ControlPlane
    workdir: Path
    process: subprocess.Popen[bytes]
    webhook_configurations: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, plane: ControlPlane, workdir: Path) -> Kueue:
        ensure_binaries()
        workdir.mkdir(parents=True, exist_ok=True)
        plane.kubectl("apply", "--server-side", "-f", str(KUEUE / "crds"))
        plane.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", "-f", str(KUEUE / "crds")
        )
        plane.kubectl("create", "namespace", NAMESPACE, check=False)
        certs = workdir / "certs"
        ca = _serving_certificate(certs)
        METRICS_CERTS.mkdir(parents=True, exist_ok=True)
        for name in ("tls.crt", "tls.key"):
            shutil.copy(certs / name, METRICS_CERTS / name)
        webhook_port, health_port = free_port(), free_port()
        configuration = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": NAMESPACE,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
            "metrics": {"bindAddress": "0"},
            "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(certs)},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "manageJobsWithoutQueueName": False,
            "integrations": {"frameworks": ["batch/job"]},
        }
        (workdir / "config.yaml").write_text(yaml.safe_dump(configuration))
        process = subprocess.Popen(
            [
                str(KUEUE / "kueue"),
                f"--config={workdir / 'config.yaml'}",
                # The visibility API is an aggregated API server of its own: not used here.
                "--feature-gates=VisibilityOnDemand=false",
                "--zap-log-level=2",
            ],
            env={**os.environ, "KUBECONFIG": str(plane.kubeconfig)},
            stdout=(workdir / "kueue.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        kueue = cls(plane, workdir, process)
        try:
            kueue._wait_ready(health_port)
            kueue._register_webhooks(webhook_port, ca)
        except BaseException:
            kueue.stop()
            raise
        return kueue

    def _wait_ready(self, health_port: int) -> None:
        def ready() -> bool:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{health_port}/readyz", timeout=2).close()
                return True
            except OSError:  # refused, or not ready yet (an HTTPError)
                return False

        wait_until_ready("kueue", self.process, ready, self.log, START_TIMEOUT)

    def _register_webhooks(self, port: int, ca: bytes) -> None:
        bundle = base64.b64encode(ca).decode()
        documents = [d for d in yaml.safe_load_all((KUEUE / "webhooks.yaml").read_text()) if d]
        for document in documents:
            configuration = copy.deepcopy(document)
            configuration["metadata"] = {"name": f"kueue-{document['metadata']['name']}"}
            webhooks = []
            for webhook in document["webhooks"]:
                path = webhook["clientConfig"]["service"]["path"]
                if not any(part in path for part in WEBHOOK_PATHS):
                    continue
                webhook["clientConfig"] = {
                    "url": f"https://127.0.0.1:{port}{path}",
                    "caBundle": bundle,
                }
                if "-batch-v1-job" in path:
                    webhook["objectSelector"] = {
                        "matchExpressions": [{"key": KUEUE_QUEUE_LABEL, "operator": "Exists"}]
                    }
                webhooks.append(webhook)
            configuration["webhooks"] = webhooks
            self.plane.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(configuration))
            self.webhook_configurations.append(
                f"{configuration['kind'].lower()}/{configuration['metadata']['name']}"
            )

    def open_queues(self, namespace: str) -> None:
        """The namespace, with the quota, flavors, Topology and LocalQueues of `queues`."""
        self.plane.kubectl("create", "namespace", namespace, check=False)
        for body in queues(namespace):
            self.plane.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(body))

    def workloads(self, namespace: str) -> list[dict[str, Any]]:
        listed = self.plane.custom().list_namespaced_custom_object(
            "kueue.x-k8s.io", "v1beta2", namespace, "workloads"
        )
        return list(listed["items"])

    def log(self) -> str:
        return (self.workdir / "kueue.log").read_text(errors="replace")

    def stop(self) -> None:
        """Unregister the webhooks (nothing would answer them), then stop the manager."""
        for name in self.webhook_configurations:
            self.plane.kubectl("delete", name, "--ignore-not-found", check=False)
        stop(self.process)


def _serving_certificate(certs: Path) -> bytes:
    """A CA, and a serving certificate for 127.0.0.1 signed by it, in Kueue's certDir."""
    certs.mkdir(parents=True, exist_ok=True)
    (certs / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=certs)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.crt", "-days", "2", "-subj", "/CN=dpo-tests-kueue-ca")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.csr",
            "-subj", "/CN=127.0.0.1")  # fmt: skip
    openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "tls.crt", "-days", "2", "-extfile", "san.ext")  # fmt: skip
    return (certs / "ca.crt").read_bytes()


def queues(namespace: str) -> list[dict[str, Any]]:
    """GPU quota for the four H100 nodes, placed by Kueue's TAS over the blocks; CPU quota for one
    quickstart pod, preempting lower priorities; a LocalQueue of each in `namespace`."""
    everything = {"cpu": "10000", "memory": "100Ti", "rdma/ib": "100"}
    return [
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "Topology",
            "metadata": {"name": TOPOLOGY},
            "spec": {"levels": [{"nodeLabel": BLOCK_LABEL}, {"nodeLabel": HOSTNAME_LABEL}]},
        },
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ResourceFlavor",
            "metadata": {"name": GPU_FLAVOR},
            "spec": {
                "nodeLabels": {GPU_PRODUCT_LABEL: "H100"},
                "nodeTaints": [GPU_TAINT],
                "topologyName": TOPOLOGY,
            },
        },
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ResourceFlavor",
            "metadata": {"name": CPU_FLAVOR},
            "spec": {"nodeLabels": {HOSTNAME_LABEL: "cpu-0"}},
        },
        _cluster_queue(
            GPU_QUEUE,
            GPU_FLAVOR,
            {"nvidia.com/gpu": str(GPU_QUOTA), **everything},
        ),
        _cluster_queue(CPU_QUEUE, CPU_FLAVOR, {"cpu": CPU_QUOTA, "memory": "100Gi"}),
        *(
            {
                "apiVersion": "kueue.x-k8s.io/v1beta2",
                "kind": "LocalQueue",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"clusterQueue": name},
            }
            for name in (GPU_QUEUE, CPU_QUEUE)
        ),
        *(
            {
                "apiVersion": "scheduling.k8s.io/v1",
                "kind": "PriorityClass",
                "metadata": {"name": name},
                "value": value,
            }
            for name, value in ((LOW_PRIORITY, 100), (HIGH_PRIORITY, 1000))
        ),
    ]


def _cluster_queue(name: str, flavor: str, quota: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {},
            "preemption": {"withinClusterQueue": "LowerPriority"},
            "resourceGroups": [
                {
                    "coveredResources": list(quota),
                    "flavors": [
                        {
                            "name": flavor,
                            "resources": [{"name": k, "nominalQuota": v} for k, v in quota.items()],
                        }
                    ],
                }
            ],
        },
    }


def admitted(workload: dict[str, Any]) -> bool:
    conditions = workload.get("status", {}).get("conditions") or []
    return any(c["type"] == "Admitted" and c["status"] == "True" for c in conditions)


@pytest.fixture(scope="session")
def kueue(pod_plane: ControlPlane) -> Iterator[Kueue]:
    running = Kueue.start(pod_plane, pod_plane.workdir / "kueue")
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(running.workdir / "certs", ignore_errors=True)
