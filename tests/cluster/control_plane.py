"""A real Kubernetes control plane for tests: etcd, kube-apiserver and kube-controller-manager,
and kube-scheduler where asked.

What envtest does for Go operators, plus the controller-manager, so that the real Job
controller and garbage collector act. The binaries come from tools/build-control-plane.sh
(cached under ~/.cache/dpo-operator). There is no kubelet: either `Kubelet` plays its part by
writing pod status, which is what the Job controller reads, or (with the scheduler) a
`tests.cluster.pod_runner.PodRunner` runs the pods scheduled to its Nodes as real processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_operator.local.kubelet import free_port
from kubernetes import client, config

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = os.environ.get("K8S_VERSION", "v1.37.2")
CACHE = Path(os.environ.get("DPO_CACHE") or Path.home() / ".cache" / "dpo-operator")
BIN = CACHE / "bin" / K8S_VERSION
PROMETHEUS_OPERATOR_CRDS = CACHE / "crds" / "prometheus-operator-v0.85.0"
SEAWEEDFS_VERSION = os.environ.get("SEAWEEDFS_VERSION", "v0.0.0-20261109003541-7506e5f91cd6")
WEED = CACHE / "bin" / "seaweedfs" / SEAWEEDFS_VERSION / "weed"
KUEUE_VERSION = os.environ.get("KUEUE_VERSION", "v0.17.0")
KUEUE = CACHE / "bin" / "kueue" / KUEUE_VERSION
ADMIN_TOKEN = "dpo-test-admin-token"  # a static token of group system:masters
# The operator's own identity (cluster-admin through RBAC, not system:masters), so the API
# server can tell its requests from everyone else's (see tools/bench_operator.py).
OPERATOR_USER = "dpo-operator"
OPERATOR_TOKEN = "dpo-test-operator-token"
READY_TIMEOUT = 120


def ensure_binaries() -> Path:
    """Build or fetch what is missing (minutes, once per machine; SeaweedFS and Kueue too);
    returns the control plane's bin directory."""
    names = (
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubectl",
        "helm",
    )
    crds = PROMETHEUS_OPERATOR_CRDS / "monitoring.coreos.com_prometheusrules.yaml"
    built = [BIN / name for name in names] + [crds, WEED, KUEUE / "kueue"]
    if not all(path.exists() for path in built):
        versions = {
            "K8S_VERSION": K8S_VERSION,
            "SEAWEEDFS_VERSION": SEAWEEDFS_VERSION,
            "KUEUE_VERSION": KUEUE_VERSION,
        }
        subprocess.run(
            [str(REPO / "tools" / "build-control-plane.sh")],
            check=True,
            env={**os.environ, **versions},
        )
    return BIN


@dataclass
class ControlPlane:
    """A running control plane in `workdir`; `kubeconfig` holds admin credentials."""

    workdir: Path
    server: str
    kubeconfig: Path
    processes: list[subprocess.Popen[bytes]]
    commands: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def start(cls, workdir: Path, *, scheduler: bool = False) -> ControlPlane:
        """With `scheduler`, kube-scheduler places pods on Nodes (a `PodRunner` serves them) and
        the PersistentVolume binder binds claims; without, tests write pod status themselves."""
        bin_dir = ensure_binaries()
        workdir.mkdir(parents=True, exist_ok=True)
        keys = workdir / "keys"
        keys.mkdir(exist_ok=True)
        _openssl("genrsa", "-out", str(keys / "sa.key"), "2048")
        _openssl("rsa", "-in", str(keys / "sa.key"), "-pubout", "-out", str(keys / "sa.pub"))
        (keys / "tokens.csv").write_text(
            f"{ADMIN_TOKEN},admin,admin-uid,system:masters\n"
            f"{OPERATOR_TOKEN},{OPERATOR_USER},operator-uid\n"
        )
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        server = f"https://127.0.0.1:{api_port}"
        plane = cls(workdir, server, workdir / "kubeconfig", [])
        try:
            plane._spawn(
                "etcd",
                [
                    str(bin_dir / "etcd"),
                    "--data-dir",
                    str(workdir / "etcd"),
                    "--listen-client-urls",
                    f"http://127.0.0.1:{etcd_port}",
                    "--advertise-client-urls",
                    f"http://127.0.0.1:{etcd_port}",
                    "--listen-peer-urls",
                    f"http://127.0.0.1:{peer_port}",
                    "--initial-advertise-peer-urls",
                    f"http://127.0.0.1:{peer_port}",
                    "--initial-cluster",
                    f"default=http://127.0.0.1:{peer_port}",
                    "--unsafe-no-fsync",
                ],
            )
            plane._spawn(
                "kube-apiserver",
                [
                    str(bin_dir / "kube-apiserver"),
                    "--etcd-servers",
                    f"http://127.0.0.1:{etcd_port}",
                    "--bind-address",
                    "127.0.0.1",
                    "--advertise-address",
                    "127.0.0.1",
                    # Loopback only: no Endpoints for the kubernetes Service (nothing here uses it).
                    "--endpoint-reconciler-type",
                    "none",
                    "--secure-port",
                    str(api_port),
                    "--cert-dir",
                    str(workdir / "certs"),
                    "--token-auth-file",
                    str(keys / "tokens.csv"),
                    "--authorization-mode",
                    "RBAC",
                    "--service-account-issuer",
                    "https://kubernetes.default.svc.cluster.local",
                    "--service-account-key-file",
                    str(keys / "sa.pub"),
                    "--service-account-signing-key-file",
                    str(keys / "sa.key"),
                    "--api-audiences",
                    "https://kubernetes.default.svc.cluster.local",
                    "--service-cluster-ip-range",
                    "10.96.0.0/16",
                    "--enable-admission-plugins",
                    "NamespaceLifecycle,ServiceAccount,Priority,"
                    "DefaultTolerationSeconds,ResourceQuota,PodSecurity",
                ],
            )
            plane._write_kubeconfig()
            plane._wait_ready()
            plane._spawn_component(
                bin_dir,
                "kube-controller-manager",
                [
                    "--controllers",
                    "job-controller,garbage-collector-controller,"
                    "serviceaccount-controller,serviceaccount-token-controller,namespace-controller,"
                    "ttl-after-finished-controller,endpointslice-controller"
                    + (",persistentvolume-binder-controller" if scheduler else ""),
                    "--service-account-private-key-file",
                    str(keys / "sa.key"),
                    "--root-ca-file",
                    str(workdir / "certs" / "apiserver.crt"),
                    "--concurrent-job-syncs",
                    "10",
                ],
            )
            if scheduler:
                plane._spawn_component(bin_dir, "kube-scheduler", [])
            plane._wait_for_default_service_account()
        except BaseException:
            plane.stop()
            raise
        return plane

    def _spawn_component(self, bin_dir: Path, name: str, flags: list[str]) -> None:
        """A controller of the control plane, on the admin kubeconfig, alone (no election)."""
        self._spawn(
            name,
            [
                str(bin_dir / name),
                "--kubeconfig",
                str(self.kubeconfig),
                "--bind-address",
                "127.0.0.1",
                "--secure-port",
                str(free_port()),
                "--leader-elect=false",
                *flags,
            ],
        )

    def _spawn(self, name: str, command: list[str]) -> None:
        log = (self.workdir / f"{name}.log").open("ab")
        self.commands[name] = command
        self.processes.append(
            subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )

    def restart(self, name: str) -> None:
        """Kill one component (SIGKILL: no graceful shutdown) and start it again, same flags."""
        command = self.commands[name]
        (process,) = [p for p in self.processes if p.args == command]
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        self.processes.remove(process)
        self._spawn(name, command)
        if name == "kube-apiserver":
            self._wait_ready()

    def _write_kubeconfig(self) -> None:
        self.kubeconfig.write_text(self.kubeconfig_for(ADMIN_TOKEN))

    def kubeconfig_for(self, token: str) -> str:
        """A kubeconfig that authenticates with `token`."""
        return (
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: test, cluster: {{server: '{self.server}', "
            f"certificate-authority: '{self.workdir / 'certs' / 'apiserver.crt'}'}}}}]\n"
            f"users: [{{name: user, user: {{token: {token}}}}}]\n"
            "contexts: [{name: test, context: {cluster: test, user: user}}]\n"
            "current-context: test\n"
        )

    def operator_kubeconfig(self) -> Path:
        """Credentials of the operator's own user, bound to cluster-admin."""
        path = self.workdir / "operator.kubeconfig"
        if not path.exists():
            self.kubectl(
                "create",
                "clusterrolebinding",
                "dpo-operator-test",
                "--clusterrole=cluster-admin",
                f"--user={OPERATOR_USER}",
            )
            path.write_text(self.kubeconfig_for(OPERATOR_TOKEN))
        return path

    def apiserver_metrics(self) -> str:
        """The kube-apiserver's own /metrics."""
        request = urllib.request.Request(
            f"{self.server}/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        context = ssl.create_default_context(cafile=str(self.workdir / "certs" / "apiserver.crt"))
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            return str(response.read().decode())

    def _wait_ready(self) -> None:
        certificate = self.workdir / "certs" / "apiserver.crt"
        request = urllib.request.Request(
            f"{self.server}/readyz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            self._check_alive()
            if not certificate.exists():  # the apiserver writes its self-signed cert first
                time.sleep(0.2)
                continue
            context = ssl.create_default_context(cafile=str(certificate))
            try:
                with urllib.request.urlopen(request, context=context, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"kube-apiserver not ready after {READY_TIMEOUT}s: {self.tail()}")

    def _wait_for_default_service_account(self) -> None:
        core = self.core()
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                core.read_namespaced_service_account("default", "default")
                return
            except client.ApiException:
                time.sleep(0.3)
        raise TimeoutError("no default ServiceAccount: is kube-controller-manager running?")

    def _check_alive(self) -> None:
        for process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args[0]} exited {process.returncode}: {self.tail()}")

    def tail(self) -> str:
        return "\n".join(
            f"--- {log.name}\n" + log.read_text(errors="replace")[-2000:]
            for log in sorted(self.workdir.glob("*.log"))
        )

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    # -- clients -------------------------------------------------------------------------------

    def api_client(self) -> client.ApiClient:
        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api_client())

    def batch(self) -> client.BatchV1Api:
        return client.BatchV1Api(self.api_client())

    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api_client())

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(BIN / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result

    @classmethod
    @contextmanager
    def with_crd(cls, workdir: Path, *, scheduler: bool = False) -> Iterator[ControlPlane]:
        """A started control plane with the DPOJob CRD installed, stopped on the way out even
        when what ran inside failed."""
        plane = cls.start(workdir, scheduler=scheduler)
        try:
            plane.install_crd()
            yield plane
        finally:
            plane.stop()

    def install_crd(self) -> None:
        """The CRDs (DPOJob, DPOSweep), applied and Established. `kubectl wait` fails outright,
        rather than waits, when it reads a CRD before the API server has written any condition."""
        self.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        for crd in ("crd/dpojobs.dpo.dev", "crd/dposweeps.dpo.dev"):
            wait_for(
                f"{crd} Established",
                lambda crd=crd: (  # type: ignore[misc]
                    self.kubectl(
                        "wait", "--for=condition=Established", crd, "--timeout=5s", check=False
                    ).returncode
                    == 0
                ),
            )

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(BIN / "helm"), "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
        return result


class Operator:
    """`dpo operator` in its own process, stoppable and restartable mid-run."""

    def __init__(
        self,
        plane: ControlPlane,
        *args: str,
        kubeconfig: Path | None = None,
        log: str = "operator.log",
        program: Path | None = None,
    ) -> None:
        """`program` is the `dpo` to run: this virtualenv's unless given."""
        self.plane = plane
        self.program = program or Path(sys.executable).parent / "dpo"
        self.args = args
        self.kubeconfig = kubeconfig or plane.operator_kubeconfig()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = plane.workdir / log
        self.metrics_port = free_port()
        self.liveness_port = free_port()

    def start(self) -> Operator:
        self.process = subprocess.Popen(
            [
                str(self.program),
                "operator",
                "--all-namespaces",
                "--metrics-port",
                str(self.metrics_port),
                "--liveness-port",
                str(self.liveness_port),
                *self.args,
            ],
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        return self

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    """`check()`'s first truthy value, polled until `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.25)
    raise TimeoutError(f"{what}: still {last!r} after {timeout}s")


class Kubelet:
    """Does what a kubelet would to pods: reports them Running, Succeeded or Failed."""

    def __init__(self, plane: ControlPlane) -> None:
        self.core = plane.core()

    def pods(self, namespace: str, job_name: str) -> list[client.V1Pod]:
        pods = self.core.list_namespaced_pod(
            namespace, label_selector=f"batch.kubernetes.io/job-name={job_name}"
        ).items
        return sorted(pods, key=lambda pod: pod.metadata.name)

    def wait_for_pods(
        self, namespace: str, job_name: str, count: int, timeout: float = 60
    ) -> list[client.V1Pod]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pods = [
                p for p in self.pods(namespace, job_name) if p.metadata.deletion_timestamp is None
            ]
            if len(pods) >= count:
                return pods
            time.sleep(0.2)
        raise TimeoutError(f"the Job controller made {len(pods)} of {count} pods for {job_name}")

    def running(self, pod: client.V1Pod) -> None:
        self._status(pod, "Running", {"running": {"startedAt": _now()}}, ready=True)

    def waiting(self, pod: client.V1Pod, reason: str, message: str) -> None:
        """The container cannot start: an image that does not pull, a Secret that is missing."""
        state = {"waiting": {"reason": reason, "message": message}}
        self._status(pod, "Pending", state, ready=False)

    def unschedulable(self, pod: client.V1Pod, message: str) -> None:
        """What the scheduler writes when no node can take the pod (a missing PVC, no room)."""
        condition = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
        }
        self.core.patch_namespaced_pod_status(
            pod.metadata.name,
            pod.metadata.namespace,
            {"status": {"phase": "Pending", "conditions": [condition]}},
        )

    def node_lost(self, pod: client.V1Pod) -> None:
        """The pod's node went away: the pod fails, marked as a disruption (not its fault)."""
        self._status(
            pod,
            "Failed",
            {"terminated": {"exitCode": 137, "reason": "NodeLost", "finishedAt": _now()}},
            ready=False,
            extra_conditions=[
                {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByPodGC"}
            ],
        )

    def succeeded(self, pod: client.V1Pod, message: str = "") -> None:
        self.terminated(pod, 0, message)

    def terminated(self, pod: client.V1Pod, exit_code: int, message: str = "") -> None:
        state = {
            "terminated": {
                "exitCode": exit_code,
                "reason": "Completed" if exit_code == 0 else "Error",
                "message": message,
                "startedAt": _now(),
                "finishedAt": _now(),
            }
        }
        self._status(pod, "Succeeded" if exit_code == 0 else "Failed", state, ready=False)

    def _status(
        self,
        pod: client.V1Pod,
        phase: str,
        state: dict[str, Any],
        *,
        ready: bool,
        extra_conditions: list[dict[str, str]] | None = None,
    ) -> None:
        container_statuses = [
            {
                "name": container.name,
                "image": container.image,
                "imageID": "",
                "ready": ready,
                "restartCount": 0,
                "started": ready,
                "state": state,
            }
            for container in pod.spec.containers
        ]
        conditions = [
            {"type": "Ready", "status": "True" if ready else "False"},
            *(extra_conditions or []),
        ]
        body = {
            "status": {
                "phase": phase,
                "podIP": "127.0.0.1",  # the operator scrapes rank 0 here: loopback only
                "startTime": _now(),
                "conditions": conditions,
                "containerStatuses": container_statuses,
            }
        }
        self.core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, body)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        raise RuntimeError(
            "openssl is needed to make the service-account keys; apt-get install openssl"
        )
    subprocess.run(["openssl", *args], check=True, capture_output=True)
