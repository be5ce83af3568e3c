"""A kubelet for tests: the pods kube-scheduler binds to this runner's Nodes run, for real, as
processes on this machine.

Each pod gets what a kubelet and a CNI plugin give it: its own network namespace with an IP on a
bridge (so two pods can both listen on the rendezvous and metrics ports, and the operator scrapes
rank 0 at its pod IP), its own mount namespace with the pod's volumes at their mount paths
(ConfigMaps and Secrets written out as files, emptyDirs, tmpfs for `medium: Memory`, a
PersistentVolume's hostPath for a claim), /etc/hosts naming the pods of its subdomain, its
hostname, the container's env with fieldRefs and secretKeyRefs resolved and $(VAR) expanded,
and its termination message file. The image is this machine's Python environment: the
container's command is found on the venv's PATH. What a pod does is reported back as a kubelet
reports it (phase, pod IP, container state, exit code, termination message, FallbackToLogsOnError),
and a deleted pod gets SIGTERM, then SIGKILL after its grace period.

Not a CNI with a policy engine: NetworkPolicies are not enforced between pods here. Needs root
(network, mount and PID namespaces, `ip` from iproute2). Mount points that do not exist
on this machine (/etc/dpo, /mnt/pvc/...) are created here as empty directories.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from dpo_operator.local.kubelet import expand_references
from kubernetes import client
from kubernetes.client import ApiException

from tests.cluster.control_plane import ControlPlane

BRIDGE = "dpo-pods"
POD_NETWORK = ipaddress.ip_network("10.244.0.0/16")
GATEWAY = next(POD_NETWORK.hosts())
SANDBOX = Path(__file__).with_name("pod_sandbox.py")
POLL_SECONDS = 0.2
# What a pod's "image" is: this Python environment and the code installed in it.
_IMAGE = [
    sys.prefix,
    *(str(Path(find_spec(p).origin).parents[1]) for p in ("dpo_operator", "dpo_trainer")),  # type: ignore[arg-type, union-attr]
]
# What the runner's own commands (ip, unshare) run with: a copy taken once, since copying
# os.environ from the runner's thread races pytest setting and unsetting PYTEST_CURRENT_TEST.
_HOST_ENV = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
MESSAGE_LIMIT = 4096  # what a kubelet keeps of a termination message
LOG_TAIL_LINES = 80  # FallbackToLogsOnError: the last lines of the log, at most MESSAGE_LIMIT


@dataclass(frozen=True)
class NodeSpec:
    """A Node this runner serves: its capacity (GPUs and other extended resources are only
    advertised; the processes run on this machine's CPUs), labels and taints."""

    name: str
    cpu: str = "16"
    memory: str = "64Gi"
    extended: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[dict[str, str], ...] = ()
    # A degraded node, for real: its pods' processes get this many CPUs (a CFS quota), and
    # their network link this rate each way (an htb class, e.g. "20mbit").
    cpu_quota: float | None = None
    link_rate: str | None = None


@dataclass
class RunningPod:
    namespace: str
    name: str
    container: str
    process: subprocess.Popen[bytes]
    netns: str
    cgroup: Path | None
    log: Path
    termination: Path
    started_at: str
    fallback_to_logs: bool
    term_sent: float | None = None
    reported: bool = False


class PodRunner:
    def __init__(self, plane: ControlPlane, workdir: Path, nodes: list[NodeSpec]) -> None:
        self.plane = plane
        self.core = plane.core()
        self.workdir = workdir
        self.nodes = {n.name: n for n in nodes}
        self.pods: dict[str, RunningPod] = {}
        self.held: set[str] = set()  # app.kubernetes.io/component values not started for now
        self.ips: dict[str, str] = {}  # pod uid -> its IP on the bridge
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    # -- the tests' handles ----------------------------------------------------------------

    def start(self) -> PodRunner:
        # A bridge left by a runner that was killed before it could clean up.
        _ip("link", "del", BRIDGE, check=False)
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{GATEWAY}/{POD_NETWORK.prefixlen}", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for node in self.nodes.values():
            self._register(node)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for pod in self.pods.values():
            _signal(pod.process, signal.SIGKILL)
            pod.process.wait()
            self._release(pod)
        _ip("link", "del", BRIDGE, check=False)

    @contextmanager
    def holding(self, component: str) -> Iterator[None]:
        """Pods of `component` (eval, promote, ...) wait to start while inside the block."""
        self.held.add(component)
        try:
            yield
        finally:
            self.held.discard(component)

    def kill(self, namespace: str, name: str) -> None:
        """SIGKILL: what an OOM kill does to a container, every process of it at once."""
        pod = next(p for p in self.pods.values() if (p.namespace, p.name) == (namespace, name))
        _signal(pod.process, signal.SIGKILL)

    def log(self, namespace: str, name: str) -> str:
        pods = [p for p in self.pods.values() if (p.namespace, p.name) == (namespace, name)]
        return pods[-1].log.read_text(errors="replace") if pods else ""

    # -- the kubelet's loop ----------------------------------------------------------------

    def _register(self, node: NodeSpec) -> None:
        # As a kubelet does: the local disk its pods' emptyDirs and logs live on.
        self.workdir.mkdir(parents=True, exist_ok=True)
        disk = shutil.disk_usage(self.workdir).total
        capacity = {
            "cpu": node.cpu,
            "memory": node.memory,
            "pods": "110",
            "ephemeral-storage": str(disk),
            **node.extended,
        }
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": node.name,
                "labels": {"kubernetes.io/hostname": node.name, **node.labels},
            },
            "spec": {"taints": list(node.taints)} if node.taints else {},
        }
        self.core.create_node(body)
        # The API server taints a new Node not-ready until the node lifecycle controller (not
        # run here) sees it heartbeat; the runner is its kubelet and it is ready.
        self.core.patch_node(
            node.name, [{"op": "add", "path": "/spec/taints", "value": list(node.taints)}]
        )
        now = _now()
        status = {
            "status": {
                "capacity": capacity,
                "allocatable": capacity,
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "pod runner is ready",
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": now,
                    }
                ],
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            }
        }
        self.core.patch_node_status(node.name, status)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except ApiException:
                pass  # the API server restarting: the next round tries again
            except Exception as error:  # a test would hang without a word; say it
                print(f"pod runner: {error!r}", file=sys.stderr)
            self._stop.wait(POLL_SECONDS)

    def _sync(self) -> None:
        listed = self.core.list_pod_for_all_namespaces().items
        ours = [p for p in listed if p.spec.node_name in self.nodes]
        present = {p.metadata.uid for p in ours}
        for uid in [u for u in self.pods if u not in present]:
            pod = self.pods.pop(uid)
            _signal(pod.process, signal.SIGKILL)
            self._release(pod)
        for pod in ours:
            self._sync_pod(pod)

    def _sync_pod(self, pod: client.V1Pod) -> None:
        uid = pod.metadata.uid
        running = self.pods.get(uid)
        if pod.metadata.deletion_timestamp is not None:
            ended = running is not None and running.process.poll() is not None
            if ended and running is not None and not running.reported:
                self._report_exit(pod, running)
            if running is None or running.process.poll() is not None:
                self._finalize(pod)
                return
            grace = pod.metadata.deletion_grace_period_seconds or 0
            if running.term_sent is None:
                running.term_sent = time.monotonic()
                _signal(running.process, signal.SIGTERM)
            if time.monotonic() - running.term_sent >= grace:
                _signal(running.process, signal.SIGKILL)
            return
        if running is None:
            if (pod.status.phase or "Pending") != "Pending":
                return
            component = (pod.metadata.labels or {}).get("app.kubernetes.io/component", "")
            if component not in self.held:
                self._start(pod)
            return
        if running.process.poll() is not None and not running.reported:
            self._report_exit(pod, running)

    def _finalize(self, pod: client.V1Pod) -> None:
        running = self.pods.pop(pod.metadata.uid, None)
        if running is not None:
            _signal(running.process, signal.SIGKILL)
            running.process.wait()
            self._release(running)
        try:
            # In the body: with a body, the API server reads no query parameter, so a grace
            # period passed as one left a pod that never ran terminating for its whole grace.
            self.core.delete_namespaced_pod(
                pod.metadata.name,
                pod.metadata.namespace,
                body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions={"uid": pod.metadata.uid}
                ),
            )
        except ApiException as error:
            if error.status not in (404, 409):
                raise

    # -- starting a pod --------------------------------------------------------------------

    def _start(self, pod: client.V1Pod) -> None:
        spec = pod.spec
        if spec.init_containers or len(spec.containers) != 1:
            raise NotImplementedError(f"pod {pod.metadata.name}: one container, no init containers")
        container = spec.containers[0]
        home = self._home(pod)
        home.mkdir(parents=True, exist_ok=True)
        ip = self.ips.setdefault(
            pod.metadata.uid, str(POD_NETWORK.network_address + len(self.ips) + 2)
        )
        node = self.nodes[spec.node_name]
        netns = _pod_network(pod.metadata.uid, ip, node.link_rate)
        cgroup = _cpu_cgroup(pod.metadata.uid, node.cpu_quota)

        hostname = spec.hostname or pod.metadata.name
        termination = home / "termination-log"
        termination.write_text("")
        hosts = home / "hosts"
        self._write_hosts(pod, ip)
        mounts = [
            *self._mounts(pod, container, home),
            _mount(str(hosts), "/etc/hosts", "file"),
            _mount(str(termination), container.termination_message_path, "file"),
        ]
        for image_path in _IMAGE:
            covered = [m["target"] for m in mounts if _is_under(image_path, m["target"])]
            if covered:
                raise RuntimeError(
                    f"pod {pod.metadata.name} mounts {covered[0]} over {image_path}, where this "
                    "runner's image (the Python environment and the repo's code) lives: run the "
                    f"tests from a checkout and a virtualenv outside {covered[0]}"
                )
        # A mount whose target holds another mount's source goes last (the pod's /tmp over the
        # /tmp where this runner keeps the pod's files).
        sources = [m["source"] for m in mounts]
        mounts.sort(key=lambda m: any(_is_under(source, m["target"]) for source in sources))
        env = self._env(pod, container, ip)
        command = [
            expand_references(part, env) for part in [*container.command, *(container.args or [])]
        ]
        sandbox = home / "sandbox.json"
        sandbox.write_text(
            json.dumps(
                {
                    "mounts": mounts,
                    "hostname": hostname,
                    "workingDir": container.working_dir or "/",
                    "command": command,
                    "env": env,
                }
            )
        )
        log = home / "log"
        # Into the node's CPU cgroup first, so that every process of the pod is in it.
        enter = (
            ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh"] if cgroup else []
        )
        process = subprocess.Popen(
            [
                *enter,
                "ip",
                "netns",
                "exec",
                netns,
                # Its own PID namespace too: when the container's PID 1 dies, the kernel kills
                # every process left in it, as a container runtime does.
                "unshare",
                "--mount",
                "--uts",
                "--pid",
                "--propagation",
                "private",
                sys.executable,
                str(SANDBOX),
                str(sandbox),
            ],
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            env=_HOST_ENV,
        )
        started = _now()
        self.pods[pod.metadata.uid] = RunningPod(
            pod.metadata.namespace,
            pod.metadata.name,
            container.name,
            process,
            netns,
            cgroup,
            log,
            termination,
            started,
            container.termination_message_policy == "FallbackToLogsOnError",
        )
        self._patch_status(
            pod,
            {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "hostIP": "127.0.0.1",
                "startTime": started,
                "conditions": _conditions(ready=True),
                "containerStatuses": [
                    {
                        "name": container.name,
                        "image": container.image,
                        "imageID": "",
                        "ready": True,
                        "started": True,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": started}},
                    }
                ],
            },
        )

    def _mounts(
        self, pod: client.V1Pod, container: client.V1Container, home: Path
    ) -> list[dict[str, Any]]:
        sources: dict[str, dict[str, Any]] = {}
        for volume in pod.spec.volumes or []:
            where = home / "volumes" / volume.name
            if volume.config_map is not None:
                data = self.core.read_namespaced_config_map(
                    volume.config_map.name, pod.metadata.namespace
                ).data
                _write_files(where, data or {})
                sources[volume.name] = _mount(str(where), "", "dir")
            elif volume.secret is not None:
                secret = self.core.read_namespaced_secret(
                    volume.secret.secret_name, pod.metadata.namespace
                )
                files = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
                _write_files(where, files)
                sources[volume.name] = _mount(str(where), "", "dir")
            elif volume.empty_dir is not None:
                if volume.empty_dir.medium == "Memory":
                    size = _bytes(volume.empty_dir.size_limit)
                    sources[volume.name] = _mount("", "", "tmpfs", size=size)
                else:
                    where.mkdir(parents=True, exist_ok=True)
                    sources[volume.name] = _mount(str(where), "", "dir")
            elif volume.persistent_volume_claim is not None:
                sources[volume.name] = _mount(
                    self._claim_path(pod.metadata.namespace, volume.persistent_volume_claim),
                    "",
                    "dir",
                )
            else:
                raise NotImplementedError(f"pod {pod.metadata.name}: volume {volume.name}")
        mounts = []
        for mount in container.volume_mounts or []:
            source = dict(sources[mount.name])
            if mount.sub_path:
                source["source"] = str(Path(source["source"]) / mount.sub_path)
            mounts.append({**source, "target": mount.mount_path, "readOnly": bool(mount.read_only)})
        return mounts

    def _claim_path(self, namespace: str, claim: client.V1PersistentVolumeClaimVolumeSource) -> str:
        """The hostPath of the PersistentVolume the claim is bound to (the scheduler placed the
        pod only once the claim was bound)."""
        bound = self.core.read_namespaced_persistent_volume_claim(claim.claim_name, namespace)
        volume = self.core.read_persistent_volume(bound.spec.volume_name)
        path = Path(volume.spec.host_path.path)
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def _env(self, pod: client.V1Pod, container: client.V1Container, ip: str) -> dict[str, str]:
        values: dict[str, str] = {}
        for source in container.env_from or []:  # first: `env` entries win over these
            if source.secret_ref is not None:
                secret = self.core.read_namespaced_secret(
                    source.secret_ref.name, pod.metadata.namespace
                )
                data = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
            elif source.config_map_ref is not None:
                data = (
                    self.core.read_namespaced_config_map(
                        source.config_map_ref.name, pod.metadata.namespace
                    ).data
                    or {}
                )
            else:
                raise NotImplementedError(f"pod {pod.metadata.name}: envFrom {source}")
            values.update({f"{source.prefix or ''}{k}": v for k, v in data.items()})
        for entry in container.env or []:
            source = entry.value_from
            if source is None:
                values[entry.name] = expand_references(entry.value or "", values)
            elif source.field_ref is not None:
                values[entry.name] = _field(pod, source.field_ref.field_path, ip)
            elif source.secret_key_ref is not None:
                ref = source.secret_key_ref
                secret = self.core.read_namespaced_secret(ref.name, pod.metadata.namespace)
                values[entry.name] = base64.b64decode((secret.data or {})[ref.key]).decode()
            elif source.config_map_key_ref is not None:
                ref = source.config_map_key_ref
                data = self.core.read_namespaced_config_map(ref.name, pod.metadata.namespace).data
                values[entry.name] = (data or {})[ref.key]
            else:
                raise NotImplementedError(f"pod {pod.metadata.name}: env {entry.name}")
        image_path = f"{Path(sys.executable).parent}{os.pathsep}/usr/local/bin:/usr/bin:/bin"
        return {
            "PATH": image_path,
            "HOME": str(Path.home()),
            "HOSTNAME": pod.spec.hostname or pod.metadata.name,
            "PYTHONUNBUFFERED": "1",
            **values,
        }

    def _home(self, pod: client.V1Pod) -> Path:
        return self.workdir / "pods" / f"{pod.metadata.namespace}_{pod.metadata.name}"

    def _write_hosts(self, pod: client.V1Pod, ip: str) -> None:
        """The pod resolves itself and every pod of its subdomain by name, as the headless
        Service's DNS records do; rewritten in place (the file is bind-mounted), so a pod
        started earlier sees those started later."""
        namespace, subdomain = pod.metadata.namespace, pod.spec.subdomain
        peers = [pod]
        if subdomain is not None:
            peers += [
                p
                for p in self.core.list_namespaced_pod(namespace).items
                if p.spec.subdomain == subdomain
                and p.metadata.uid in self.ips
                and p.metadata.uid != pod.metadata.uid
            ]
        entries = [
            (
                self.ips.get(p.metadata.uid, ip),
                p.spec.hostname or p.metadata.name,
                subdomain,
                namespace,
            )
            for p in peers
        ]
        text = _hosts_lines(entries)
        for peer in peers:
            hosts = self._home(peer) / "hosts"
            with hosts.open("r+" if hosts.exists() else "w") as sink:
                sink.seek(0)
                sink.write(text)
                sink.truncate()

    # -- a pod's end -----------------------------------------------------------------------

    def _report_exit(self, pod: client.V1Pod, running: RunningPod) -> None:
        code = running.process.returncode
        code = 128 - code if code < 0 else code  # killed by a signal: 128 + its number
        message = running.termination.read_text(errors="replace")[:MESSAGE_LIMIT]
        if not message and code != 0 and running.fallback_to_logs:
            tail = running.log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            message = "\n".join(tail)[-MESSAGE_LIMIT:]
        finished = _now()
        self._patch_status(
            pod,
            {
                "phase": "Succeeded" if code == 0 else "Failed",
                "conditions": _conditions(ready=False),
                "containerStatuses": [
                    {
                        "name": running.container,
                        "image": pod.spec.containers[0].image,
                        "imageID": "",
                        "ready": False,
                        "started": False,
                        "restartCount": 0,
                        "state": {
                            "terminated": {
                                "exitCode": code,
                                "reason": "Completed" if code == 0 else "Error",
                                "message": message,
                                "startedAt": running.started_at,
                                "finishedAt": finished,
                            }
                        },
                    }
                ],
            },
        )
        running.reported = True
        self._release(running)

    def _release(self, pod: RunningPod) -> None:
        _ip("netns", "del", pod.netns, check=False)
        if pod.cgroup is not None:
            with suppress(OSError):  # a process of the pod still leaving
                pod.cgroup.rmdir()

    def _patch_status(self, pod: client.V1Pod, status: dict[str, Any]) -> None:
        self.core.patch_namespaced_pod_status(
            pod.metadata.name, pod.metadata.namespace, {"status": status}
        )


CPU_CGROUPS = Path("/sys/fs/cgroup/cpu/dpo-pods")
CFS_PERIOD_US = 100_000


def _cpu_cgroup(uid: str, cpus: float | None) -> Path | None:
    """A cgroup (v1 cpu controller) holding the pod to `cpus` CPUs, or None."""
    if cpus is None:
        return None
    cgroup = CPU_CGROUPS / uid[:8]
    cgroup.mkdir(parents=True, exist_ok=True)
    (cgroup / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
    (cgroup / "cpu.cfs_quota_us").write_text(str(int(cpus * CFS_PERIOD_US)))
    return cgroup


def _shape(device: str, rate: str, netns: str | None = None) -> None:
    """What leaves `device` goes at most `rate` (htb: netem and tbf are not in this kernel)."""
    inside = ["-n", netns] if netns else []
    tc = ["tc", *inside]
    for command in (
        [*tc, "qdisc", "add", "dev", device, "root", "handle", "1:", "htb", "default", "10"],
        [
            *tc,
            "class",
            "add",
            "dev",
            device,
            "parent",
            "1:",
            "classid",
            "1:10",
            "htb",
            "rate",
            rate,
        ],
    ):
        subprocess.run(command, check=True, capture_output=True, env=_HOST_ENV)


def _pod_network(uid: str, ip: str, link_rate: str | None = None) -> str:
    """A network namespace for the pod, on the bridge at `ip` (its link at `link_rate` each
    way, if given); returns its name."""
    netns, veth = f"dpo-{uid[:8]}", f"v{uid[:8]}"
    _ip("netns", "del", netns, check=False)  # left by an earlier try that failed midway
    _ip("netns", "add", netns)
    _ip("link", "add", veth, "type", "veth", "peer", "eth0", "netns", netns)
    _ip("link", "set", veth, "master", BRIDGE, "up")
    _ip("-n", netns, "addr", "add", f"{ip}/{POD_NETWORK.prefixlen}", "dev", "eth0")
    _ip("-n", netns, "link", "set", "eth0", "up")
    _ip("-n", netns, "link", "set", "lo", "up")
    _ip("-n", netns, "route", "add", "default", "via", str(GATEWAY))
    if link_rate is not None:
        _shape(veth, link_rate)  # into the pod
        _shape("eth0", link_rate, netns)  # out of it
    return netns


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True, env=_HOST_ENV)


def _signal(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """SIGTERM to the sandbox, which passes it on to the container's PID 1; SIGKILL to PID 1
    itself (the sandbox's child), which takes every process of the container with it."""
    if process.poll() is not None:
        return
    if sig == signal.SIGKILL:
        with suppress(OSError):
            init = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
            if init:
                os.kill(int(init[0]), sig)
                return
    with suppress(ProcessLookupError):
        process.send_signal(sig)


def _mount(source: str, target: str, kind: str, size: str | None = None) -> dict[str, Any]:
    return {"source": source, "target": target, "kind": kind, "readOnly": False, "size": size}


_QUANTITY = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def _bytes(quantity: str | None) -> str | None:
    """A Kubernetes quantity ("256Mi") as the byte count mount(8) takes."""
    if quantity is None:
        return None
    number, suffix = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity).groups()  # type: ignore[union-attr]
    return str(int(float(number) * _QUANTITY[suffix]))


def _write_files(where: Path, data: dict[str, str]) -> None:
    where.mkdir(parents=True, exist_ok=True)
    for key, value in data.items():
        (where / key).write_text(value)


def _field(pod: client.V1Pod, path: str, ip: str) -> str:
    keyed = re.fullmatch(r"metadata\.(annotations|labels)\['(.+)'\]", path)
    if keyed:
        values = pod.metadata.annotations if keyed[1] == "annotations" else pod.metadata.labels
        return str((values or {}).get(keyed[2], ""))
    simple = {
        "metadata.name": pod.metadata.name,
        "metadata.namespace": pod.metadata.namespace,
        "metadata.uid": pod.metadata.uid,
        "spec.nodeName": pod.spec.node_name,
        "spec.serviceAccountName": pod.spec.service_account_name,
        "status.podIP": ip,
        "status.hostIP": "127.0.0.1",
    }
    if path not in simple:
        raise NotImplementedError(f"pod {pod.metadata.name}: fieldRef {path}")
    return str(simple[path])


def _hosts_lines(entries: list[tuple[str, str, str | None, str]]) -> str:
    lines = ["127.0.0.1\tlocalhost"]
    for ip, hostname, subdomain, namespace in entries:
        names = [hostname]
        if subdomain:
            names = [
                f"{hostname}.{subdomain}.{namespace}.svc.cluster.local",
                f"{hostname}.{subdomain}",
                hostname,
            ]
        lines.append(f"{ip}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


def _is_under(path: str, directory: str) -> bool:
    return bool(path) and (path == directory or path.startswith(directory.rstrip("/") + "/"))


def _conditions(*, ready: bool) -> list[dict[str, str]]:
    now = _now()
    state = "True" if ready else "False"
    return [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
        {"type": "Initialized", "status": "True", "lastTransitionTime": now},
        {"type": "ContainersReady", "status": state, "lastTransitionTime": now},
        {"type": "Ready", "status": state, "lastTransitionTime": now},
    ]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
