"""Benchmark: the operator on a real control plane with many DPOJobs.

Usage:
    python tools/bench_operator.py [--jobs 200]

Starts etcd, kube-apiserver and kube-controller-manager (tests/cluster/control_plane.py), runs
`dpo operator` as its own process, creates the DPOJobs at once and prints the time from create
to training Job (p50/p99), reconcile time, API requests per DPOJob and the operator's peak
memory. Needs the binaries of tools/build-control-plane.sh.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kubernetes import watch  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tests.cluster.control_plane import ControlPlane, free_port  # noqa: E402
from tests.conftest import MINIMAL  # noqa: E402

NAMESPACE = "bench"


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    args = parser.parse_args()

    plane = ControlPlane.start(Path(tempfile.mkdtemp(prefix="dpo-bench-")))
    operator = None
    try:
        plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds" / "dpojob.yaml"))
        plane.kubectl("wait", "--for=condition=Established", "crd/dpojobs.dpo.dev")
        plane.kubectl("create", "namespace", NAMESPACE)
        metrics_port = free_port()
        operator = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "dpo"),
                "operator",
                "--all-namespaces",
                "--metrics-port",
                str(metrics_port),
                "--liveness-port",
                str(free_port()),
            ],
            env={**os.environ, "KUBECONFIG": str(plane.kubeconfig)},
            stdout=(plane.workdir / "operator.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        time.sleep(3)  # kopf starts its watches

        created: dict[str, float] = {}
        first_job: dict[str, float] = {}
        done = threading.Event()

        def watch_jobs() -> None:
            stream = watch.Watch().stream(
                plane.batch().list_namespaced_job, NAMESPACE, timeout_seconds=600
            )
            for event in stream:
                labels = event["object"].metadata.labels or {}
                owner = labels.get("dpo.dev/job-name")
                if labels.get("app.kubernetes.io/component") == "train" and owner not in first_job:
                    first_job[owner] = time.monotonic()
                    if len(first_job) >= args.jobs:
                        done.set()
                        return

        threading.Thread(target=watch_jobs, daemon=True).start()
        before = scrape(metrics_port)
        custom = __import__("kubernetes").client.CustomObjectsApi(plane.api_client())
        started = time.monotonic()
        for index in range(args.jobs):
            manifest = copy.deepcopy(MINIMAL)
            manifest["metadata"] = {"name": f"job-{index:04d}", "namespace": NAMESPACE}
            custom.create_namespaced_custom_object(
                "dpo.dev", "v1alpha1", NAMESPACE, "dpojobs", manifest
            )
            created[f"job-{index:04d}"] = time.monotonic()
        create_seconds = time.monotonic() - started
        if not done.wait(timeout=600):
            print(f"only {len(first_job)} of {args.jobs} training Jobs appeared", file=sys.stderr)
        time.sleep(20)  # let timers and follow-up events settle into steady state
        after = scrape(metrics_port)

        latencies = [first_job[name] - created[name] for name in created if name in first_job]
        reconciles = after["dpo_operator_reconcile_seconds_count"] - before.get(
            "dpo_operator_reconcile_seconds_count", 0
        )
        reconcile_time = after["dpo_operator_reconcile_seconds_sum"] - before.get(
            "dpo_operator_reconcile_seconds_sum", 0
        )
        requests = after["dpo_operator_api_requests_total"] - before.get(
            "dpo_operator_api_requests_total", 0
        )
        print(
            f"\n{args.jobs} DPOJobs created in {create_seconds:.1f}s "
            f"(Kubernetes {os.environ.get('K8S_VERSION', 'v1.37.2')}, 2 CPUs shared by "
            "etcd, apiserver, controller-manager and operator)"
        )
        print(
            f"create -> training Job  p50 {statistics.median(latencies):.2f}s  "
            f"p99 {percentile(latencies, 0.99):.2f}s  max {max(latencies):.2f}s  "
            f"({len(latencies)}/{args.jobs} seen)"
        )
        mean_ms = reconcile_time / reconciles * 1000
        print(f"reconciles              {reconciles:.0f}  mean {mean_ms:.1f} ms")
        print(
            f"API requests / DPOJob   {requests / args.jobs:.1f} (reconciles; kopf's watches "
            "and annotation patches not counted)"
        )
        print(f"operator peak memory    {peak_rss_mib(operator.pid):.0f} MiB")
    finally:
        if operator is not None:
            operator.kill()
        plane.stop()


if __name__ == "__main__":
    main()
