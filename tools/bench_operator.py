"""Benchmark: the operator on a real control plane with many DPOJobs, counted at the API server.

Usage:
    python tools/bench_operator.py [--jobs 200 1000]

For each count N: starts etcd, kube-apiserver and kube-controller-manager
(tests/cluster/control_plane.py), runs `dpo operator` as its own process under its own user,
creates N DPOJobs at once and plays kubelet for every pod, so that each DPOJob goes through its
whole lifecycle (training, gate, promotion, Succeeded). It prints the operator's API requests
per DPOJob lifecycle by verb (measured over the N, before the probes below), its memory with
the DPOJobs and their children live, and the time from a DPOJob's create to its training Job:
for the N created at once, and for 20 more created one at a time with the N live (the p50/p99
of the final line). It ends with one line per N:

    operator bench: jobs=N p50_s=… p99_s=… burst_p50_s=… burst_p99_s=… writes_per_job=…
        reads_per_job=… rss_mib=…

Requests are counted by the kube-apiserver itself. Its `apiserver_request_total` has no label
for the client, so the benchmark installs one API Priority and Fairness FlowSchema per verb
that matches only the operator's user; `apiserver_flowcontrol_dispatched_requests_total` per
FlowSchema then counts every request the operator made, kopf's own event posts included.
The operator runs as its image installs it: from a virtualenv with only the `operator` extra,
pinned by constraints.txt (no ML stack, no Kubernetes client, no test tools), kept under
OPERATOR_VENVS and refreshed with this tree's code on every run.

Needs the binaries of tools/build-control-plane.sh.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
from kubernetes import client, watch  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tests.cluster.control_plane import OPERATOR_USER, ControlPlane, Kubelet, Operator  # noqa: E402
from tests.conftest import example_manifest  # noqa: E402
from tests.reports import GATE_PASSED, PROMOTED  # noqa: E402

NAMESPACE = "bench"
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
WRITES = ("create", "update", "patch", "delete", "deletecollection")
FLOW_SCHEMA = "dpo-operator-{}"
# How long a training pod runs before it succeeds: long enough for the operator to see it run.
TRAINING_SECONDS = 2.0
# DPOJobs created one at a time once all N are live, for the latency of the final line.
PROBES = 20
OPERATOR_VENVS = Path.home() / ".cache" / "dpo-operator" / "operator-venvs"


def operator_program() -> Path:
    """`dpo` installed as the operator image installs it (see the Dockerfile), with this tree's
    code. The virtualenv holds exactly the operator's dependencies: one per version of them, so a
    package the operator no longer needs is not left behind to be imported (kopf imports the
    Kubernetes client whenever it is there)."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = json.dumps(pyproject["project"]["optional-dependencies"]["operator"])
    wanted += (REPO / "constraints.txt").read_text()
    venv = OPERATOR_VENVS / hashlib.sha256(wanted.encode()).hexdigest()[:12]
    if OPERATOR_VENVS.exists():
        for other in OPERATOR_VENVS.iterdir():
            if other != venv:
                shutil.rmtree(other)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        constraints = ["--constraint", str(REPO / "constraints.txt")]
        subprocess.run([*pip, *constraints, f"{REPO}[operator]"], check=True)
    subprocess.run([*pip, "--no-deps", "--force-reinstall", str(REPO)], check=True)
    return venv / "bin" / "dpo"


def install_flow_schemas(plane: ControlPlane) -> None:
    """One FlowSchema per verb for the operator's user, ahead of every built-in one but
    `exempt`, so the API server counts the operator's requests by verb."""
    subjects = [{"kind": "User", "user": {"name": OPERATOR_USER}}]
    schemas = []
    for verb in (*VERBS, "other"):
        if verb == "other":  # discovery and other non-resource requests
            rule: dict[str, object] = {
                "subjects": subjects,
                "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
            }
        else:
            resources = {"apiGroups": ["*"], "resources": ["*"], "namespaces": ["*"]}
            rule = {
                "subjects": subjects,
                "resourceRules": [{"verbs": [verb], "clusterScope": True, **resources}],
            }
        schemas.append(
            {
                "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
                "kind": "FlowSchema",
                "metadata": {"name": FLOW_SCHEMA.format(verb)},
                "spec": {
                    "matchingPrecedence": 100,
                    "priorityLevelConfiguration": {"name": "workload-high"},
                    "distinguisherMethod": {"type": "ByUser"},
                    "rules": [rule],
                },
            }
        )
    plane.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(schemas))


def operator_requests(plane: ControlPlane) -> Counter[str]:
    """The operator's requests so far, by verb, as the API server counted them."""
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(plane.apiserver_metrics()):
        if family.name != "apiserver_flowcontrol_dispatched_requests":
            continue
        for sample in family.samples:
            schema = sample.labels.get("flow_schema", "")
            if sample.name.endswith("_total") and schema.startswith("dpo-operator-"):
                counts[schema.removeprefix("dpo-operator-")] += int(sample.value)
    return counts


def rss_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class PodPlayer:
    """Plays kubelet for every pod in the namespace: training pods run, then succeed; the gate
    passes; the promotion succeeds."""

    def __init__(self, plane: ControlPlane) -> None:
        self.kubelet = Kubelet(plane)
        self.core = plane.core()
        self.pool = ThreadPoolExecutor(max_workers=8)
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        seen: set[str] = set()
        for event in watch.Watch().stream(
            self.core.list_namespaced_pod, NAMESPACE, timeout_seconds=1800
        ):
            pod = event["object"]
            if event["type"] != "ADDED" or pod.metadata.name in seen:
                continue
            seen.add(pod.metadata.name)
            self.pool.submit(self._play, pod)

    def _play(self, pod: client.V1Pod) -> None:
        component = pod.metadata.labels["app.kubernetes.io/component"]
        if component == "train":
            self.kubelet.running(pod)
            time.sleep(TRAINING_SECONDS)
        self.kubelet.succeeded(
            pod, {"train": "", "eval": GATE_PASSED, "promote": PROMOTED}[component]
        )


def bench(jobs: int, program: Path) -> str:
    plane = ControlPlane.start(Path(tempfile.mkdtemp(prefix="dpo-bench-")))
    operator = None
    try:
        plane.install_crd()
        plane.kubectl("create", "namespace", NAMESPACE)
        install_flow_schemas(plane)
        operator = Operator(plane, program=program).start()
        time.sleep(5)  # kopf lists and starts its watches
        assert operator.process is not None
        if operator.process.poll() is not None:
            raise RuntimeError(f"the operator exited: {operator.log.read_text()[-2000:]}")

        first_job: dict[str, float] = {}
        succeeded: set[str] = set()
        all_trained, all_done = threading.Event(), threading.Event()

        def follow_jobs() -> None:
            for event in watch.Watch().stream(
                plane.batch().list_namespaced_job, NAMESPACE, timeout_seconds=1800
            ):
                labels = event["object"].metadata.labels or {}
                owner = labels.get("dpo.dev/job-name")
                if labels.get("app.kubernetes.io/component") == "train" and owner not in first_job:
                    first_job[owner] = time.monotonic()
                    if len(first_job) >= jobs:
                        all_trained.set()

        custom = client.CustomObjectsApi(plane.api_client())

        def follow_dpojobs() -> None:
            for event in watch.Watch().stream(
                custom.list_namespaced_custom_object,
                "dpo.dev",
                "v1alpha1",
                NAMESPACE,
                "dpojobs",
                timeout_seconds=1800,
            ):
                body = event["object"]
                if (body.get("status") or {}).get("phase") == "Succeeded":
                    succeeded.add(body["metadata"]["name"])
                    if len(succeeded) >= jobs:
                        all_done.set()

        threading.Thread(target=follow_jobs, daemon=True).start()
        threading.Thread(target=follow_dpojobs, daemon=True).start()
        PodPlayer(plane)
        before = operator_requests(plane)
        created: dict[str, float] = {}
        started = time.monotonic()
        quickstart = example_manifest("quickstart")  # trains, gates and promotes
        for index in range(jobs):
            manifest = copy.deepcopy(quickstart)
            manifest["metadata"] = {"name": f"job-{index:04d}", "namespace": NAMESPACE}
            custom.create_namespaced_custom_object(
                "dpo.dev", "v1alpha1", NAMESPACE, "dpojobs", manifest
            )
            created[f"job-{index:04d}"] = time.monotonic()
        create_seconds = time.monotonic() - started
        if not all_trained.wait(timeout=900):
            print(f"only {len(first_job)} of {jobs} training Jobs appeared", file=sys.stderr)
        if not all_done.wait(timeout=1800):
            print(f"only {len(succeeded)} of {jobs} DPOJobs Succeeded", file=sys.stderr)
        lifecycle_seconds, finished = time.monotonic() - started, len(succeeded)
        time.sleep(10)  # late events and follow-up reconciles settle
        after = operator_requests(plane)
        burst = [first_job[name] - created[name] for name in created if name in first_job]

        # With all N live, new DPOJobs one at a time: how fast the operator answers one.
        probes: list[float] = []
        for index in range(PROBES):
            name = f"probe-{index:02d}"
            manifest = copy.deepcopy(quickstart)
            manifest["metadata"] = {"name": name, "namespace": NAMESPACE}
            sent = time.monotonic()
            custom.create_namespaced_custom_object(
                "dpo.dev", "v1alpha1", NAMESPACE, "dpojobs", manifest
            )
            while name not in first_job and time.monotonic() - sent < 60:
                time.sleep(0.01)
            probes.append(first_job.get(name, float("inf")) - sent)
            time.sleep(0.5)
        rss = rss_mib(operator.process.pid, "VmRSS")
        cpu = {
            Path(str(process.args[0])).name: cpu_seconds(process.pid)
            for process in [operator.process, *plane.processes]
        }
        peak = rss_mib(operator.process.pid, "VmHWM")

        requests = after - before
        writes = sum(requests[verb] for verb in WRITES) / jobs
        reads = sum(requests[verb] for verb in ("get", "list", "watch")) / jobs
        print(
            f"\n{jobs} DPOJobs created in {create_seconds:.1f}s; {finished} Succeeded "
            f"after {lifecycle_seconds:.0f}s (2 CPUs shared by etcd, apiserver, "
            "controller-manager, operator and this script)"
        )
        print(
            f"create -> training Job, all {jobs} created at once: "
            f"p50 {statistics.median(burst):.2f}s  p99 {percentile(burst, 0.99):.2f}s  "
            f"max {max(burst):.2f}s  ({len(burst)}/{jobs} seen)"
        )
        print(
            f"create -> training Job, one at a time with {jobs} live: "
            f"p50 {statistics.median(probes):.3f}s  p99 {percentile(probes, 0.99):.3f}s  "
            f"({PROBES} DPOJobs)"
        )
        by_verb = "  ".join(f"{verb} {requests[verb] / jobs:.2f}" for verb in (*VERBS, "other"))
        print(f"operator requests / DPOJob lifecycle, by verb: {by_verb}")
        reasons = Counter(
            event.reason
            for event in plane.core().list_namespaced_event(NAMESPACE).items
            if event.involved_object.kind == "DPOJob"
            and not event.involved_object.name.startswith("probe-")
        )
        print(
            "Events / DPOJob: "
            + "  ".join(f"{reason} {count / jobs:.2f}" for reason, count in sorted(reasons.items()))
        )
        print(f"operator memory with {jobs} DPOJobs live: {rss:.0f} MiB (peak {peak:.0f} MiB)")
        print("CPU seconds: " + "  ".join(f"{name} {seconds:.1f}" for name, seconds in cpu.items()))
        return (
            f"operator bench: jobs={jobs} p50_s={statistics.median(probes):.3f} "
            f"p99_s={percentile(probes, 0.99):.3f} burst_p50_s={statistics.median(burst):.2f} "
            f"burst_p99_s={percentile(burst, 0.99):.2f} writes_per_job={writes:.2f} "
            f"reads_per_job={reads:.2f} rss_mib={rss:.0f}"
        )
    finally:
        if operator is not None:
            operator.kill()
        plane.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[200, 1000])
    args = parser.parse_args()
    program = operator_program()
    lines = [bench(jobs, program) for jobs in args.jobs]
    print()
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
