"""Kueue admits DPOJobs for real: its manager, built from sigs.k8s.io/kueue, owns the queued
training Jobs' suspension. A gang waits, Queued, while another holds the GPU quota, and is
admitted when that quota frees; Kueue's topology-aware scheduling, not the test and not pod
affinity, puts each gang in one block of the simulated GPU Nodes. A run preempted by a higher
priority one resumes from its checkpoint once readmitted, without spending a restart."""

from __future__ import annotations

from typing import Any

from tests.cluster.control_plane import ControlPlane, Operator, wait_for
from tests.cluster.kueue import (
    CPU_QUEUE,
    GPU_QUEUE,
    HIGH_PRIORITY,
    LOW_PRIORITY,
    Kueue,
    admitted,
    queues,
)
from tests.cluster.pod_plane import BLOCK_LABEL, GPU_TAINT, NODES, TRAINING_TIMEOUT, Run
from tests.cluster.pod_runner import PodRunner

BLOCK = {n.name: n.labels.get(BLOCK_LABEL) for n in NODES}
QUEUED_GANG: dict[str, Any] = {
    "scheduling.queueName": GPU_QUEUE,
    "scheduling.tolerations": [
        {"key": GPU_TAINT["key"], "operator": "Exists", "effect": GPU_TAINT["effect"]}
    ],
    "scheduling.topologyKey": BLOCK_LABEL,
    "scheduling.topologyPolicy": "Required",
    "promotion.target": "pvc://dpo-checkpoints/promoted/llama",
}
GANG = "llama-8b-lora-infiniband"  # 2 nodes x 8 GPUs: the GPU quota holds one gang


def workload_of(kueue: Kueue, run: Run, attempt: int = 1) -> dict[str, Any] | None:
    job = f"{run.name}-train-{attempt}"
    return next(
        (
            w
            for w in kueue.workloads(run.namespace)
            if any(o["name"] == job for o in w["metadata"].get("ownerReferences", []))
        ),
        None,
    )


def train_job_suspended(run: Run, attempt: int = 1) -> bool:
    job = run.plane.batch().read_namespaced_job(f"{run.name}-train-{attempt}", run.namespace)
    return bool(job.spec.suspend)


def test_a_queued_gang_waits_for_gpu_quota_and_kueue_places_it_in_one_block(
    pod_plane: ControlPlane, pod_runner: PodRunner, pod_operator: Operator, kueue: Kueue
) -> None:
    namespace = "queued-gangs"
    pod_plane.kubectl("create", "namespace", namespace, check=False)
    kueue.apply(*queues(namespace))
    with pod_runner.holding("train"):
        first = Run(pod_plane, pod_runner, namespace, "first", GANG, **QUEUED_GANG)
        first_nodes = wait_for("first admitted and placed", lambda: first.placed(2), 120)
        assert len({BLOCK[n] for n in first_nodes}) == 1, f"one gang, one block: {first_nodes}"
        workload = workload_of(kueue, first)
        assert workload is not None
        assert admitted(workload), workload
        (assignment,) = workload["status"]["admission"]["podSetAssignments"]
        topology = assignment["topologyAssignment"]
        assert topology["levels"] == ["kubernetes.io/hostname"]
        (hosts,) = topology["slices"][0]["valuesPerLevel"]
        assigned = [hosts["individual"]["prefix"] + root for root in hosts["individual"]["roots"]]
        assert sorted(assigned) == first_nodes, "the pods went where Kueue's TAS put them"

        second = Run(pod_plane, pod_runner, namespace, "second", GANG, **QUEUED_GANG)
        pending = wait_for("second's workload", lambda: workload_of(kueue, second))
        assert not admitted(pending), pending
        queued = wait_for("second Queued", lambda: second.status().get("phase") == "Queued")
        assert queued
        assert train_job_suspended(second), "Kueue keeps it suspended: the quota is used"
        reserved = next(c for c in pending["status"]["conditions"] if c["type"] == "QuotaReserved")
        assert reserved["status"] == "False"
        assert "nvidia.com/gpu" in reserved["message"], reserved

        pod_plane.kubectl("delete", "dpojob", "first", "-n", namespace)
        second_nodes = wait_for(
            "second admitted once the quota freed", lambda: second.placed(2), 180
        )
        assert len({BLOCK[n] for n in second_nodes}) == 1, f"one gang, one block: {second_nodes}"
        assert not train_job_suspended(second)
        assert second.status().get("restarts", 0) == 0
    pod_plane.kubectl("delete", "namespace", namespace, "--wait=false")


def test_a_run_preempted_by_kueue_resumes_from_its_checkpoint_without_spending_a_restart(
    pod_plane: ControlPlane, pod_runner: PodRunner, pod_operator: Operator, kueue: Kueue
) -> None:
    namespace = "preempted"
    pod_plane.kubectl("create", "namespace", namespace, check=False)
    kueue.apply(*queues(namespace))
    low = Run(
        pod_plane,
        pod_runner,
        namespace,
        "low",
        **{"scheduling.queueName": CPU_QUEUE, "scheduling.priorityClassName": LOW_PRIORITY},
    )
    first = low.pod("train")
    checkpoint = low.artifacts / "checkpoints" / "checkpoint-20" / "trainer_state.json"
    wait_for("low's checkpoint-20", checkpoint.exists, TRAINING_TIMEOUT)

    high = Run(
        pod_plane,
        pod_runner,
        namespace,
        "high",
        **{
            "scheduling.queueName": CPU_QUEUE,
            "scheduling.priorityClassName": HIGH_PRIORITY,
            "dpo.maxSteps": 20,
            "promotion.target": "pvc://dpo-runs/promoted/high",
        },
    )

    def evicted() -> dict[str, Any] | None:
        workload = workload_of(kueue, low) or {}
        conditions = workload.get("status", {}).get("conditions") or []
        return next(
            (c for c in conditions if c["type"] == "Evicted" and c["status"] == "True"), None
        )

    eviction = wait_for("low preempted by Kueue", evicted, 120)
    assert eviction["reason"] == "Preempted", eviction
    wait_for("low Queued again", lambda: low.status().get("phase") == "Queued", 120)
    high.wait_phase("Succeeded")

    second = wait_for(
        "low's replacement pod",
        lambda: (name := low.pod("train")) != first and name,
        TRAINING_TIMEOUT,
    )
    status = low.wait_phase("Succeeded")
    assert status.get("restarts", 0) == 0, "a preemption is not a failure"
    assert status.get("attempt") == 1
    log = pod_runner.log(namespace, second)
    assert "resuming from" in log, log[-3000:]
    steps = [
        int(line.split()[1].split("/")[0]) for line in log.splitlines() if line.startswith("step ")
    ]
    assert steps, log[-3000:]
    assert steps[0] > 20, "the readmitted pod went on from the checkpoint"
    pod_plane.kubectl("delete", "namespace", namespace, "--wait=false")
