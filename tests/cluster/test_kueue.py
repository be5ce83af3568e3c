"""Kueue admits DPOJobs for real: its manager, built from sigs.k8s.io/kueue, owns the queued
training Jobs' suspension. A gang waits, Queued, while two others hold the GPU quota, and is
admitted when that quota frees; Kueue's topology-aware scheduling, not the test and not pod
affinity, puts each gang in one block of the simulated GPU Nodes, and each shard group of an
hsdp run in one block. A run preempted by a higher
priority one resumes from its checkpoint once readmitted, without spending a restart."""

from __future__ import annotations

import json
from typing import Any

import yaml
from dpo_trainer.io.artifacts import EVAL_REPORT
from dpo_trainer.io.checkpoints import COMPLETE_MARKER
from dpo_trainer.publish.pointer import CURRENT

from tests.cluster.control_plane import ControlPlane, Operator, wait_for
from tests.cluster.kueue import (
    CPU_QUEUE,
    GPU_QUEUE,
    HIGH_PRIORITY,
    LOW_PRIORITY,
    Kueue,
    admitted,
)
from tests.cluster.pod_plane import (
    BLOCK_LABEL,
    GPU_PRODUCT_LABEL,
    GPU_TAINT,
    NODES,
    TRAINING_TIMEOUT,
    Run,
    namespace_logs,
    output_volume,
)
from tests.cluster.pod_runner import PodRunner
from tests.conftest import example_manifest, set_fields

BLOCK = {n.name: n.labels.get(BLOCK_LABEL) for n in NODES}
QUEUED_GANG: dict[str, Any] = {
    # What is tested is placement; the hub the initializer would resolve is out of reach here.
    "model.initialize": False,
    "scheduling.queueName": GPU_QUEUE,
    "scheduling.tolerations": [
        {"key": GPU_TAINT["key"], "operator": "Exists", "effect": GPU_TAINT["effect"]}
    ],
    "scheduling.topologyKey": BLOCK_LABEL,
    "scheduling.topologyPolicy": "Required",
    "promotion.target": "pvc://dpo-checkpoints/promoted/llama",
}
GANG = "llama-8b-lora-infiniband"  # 2 nodes x 8 GPUs: the GPU quota holds two gangs


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


def assigned_nodes(workload: dict[str, Any]) -> list[str]:
    """The Nodes Kueue's TAS assigned to the training pods (one podset, by hostname)."""
    (assignment,) = workload["status"]["admission"]["podSetAssignments"]
    topology = assignment["topologyAssignment"]
    assert topology["levels"] == ["kubernetes.io/hostname"], topology
    nodes = []
    for topology_slice in topology["slices"]:
        (hosts,) = topology_slice["valuesPerLevel"]
        individual = hosts["individual"]
        nodes += [individual.get("prefix", "") + root for root in individual["roots"]]
    return sorted(nodes)


def release_gpu_nodes(plane: ControlPlane, namespace: str) -> None:
    """Delete the namespace's runs and wait until their pods are gone from the Nodes."""
    plane.kubectl("delete", "dpojobs", "--all", "-n", namespace)
    wait_for(
        f"the pods of {namespace} gone",
        lambda: not plane.core().list_namespaced_pod(namespace).items,
        120,
    )
    plane.kubectl("delete", "namespace", namespace, "--wait=false")


def test_a_queued_gang_waits_for_gpu_quota_and_kueue_places_it_in_one_block(
    pod_plane: ControlPlane, pod_runner: PodRunner, pod_operator: Operator, kueue: Kueue
) -> None:
    namespace = "queued-gangs"
    kueue.open_queues(namespace)
    with pod_runner.holding("train"):
        gangs = [
            Run(pod_plane, pod_runner, namespace, name, GANG, **QUEUED_GANG)
            for name in ("first", "second")
        ]
        placements = [
            wait_for(f"{g.name} admitted and placed", lambda g=g: g.placed(2), 120) for g in gangs
        ]
        for gang, nodes in zip(gangs, placements, strict=True):
            assert len({BLOCK[n] for n in nodes}) == 1, f"one gang, one block: {nodes}"
            workload = workload_of(kueue, gang)
            assert workload is not None
            assert admitted(workload), workload
            assert assigned_nodes(workload) == nodes, "the pods went where Kueue's TAS put them"
        assert {BLOCK[p[0]] for p in placements} == {"a", "b"}

        third = Run(pod_plane, pod_runner, namespace, "third", GANG, **QUEUED_GANG)
        pending = wait_for("third's workload", lambda: workload_of(kueue, third))
        assert not admitted(pending), pending
        wait_for("third Queued", lambda: third.status().get("phase") == "Queued")
        assert train_job_suspended(third), "Kueue keeps it suspended: the quota is used"
        reserved = wait_for(
            "third's quota refused",
            lambda: next(
                (
                    c
                    for c in (workload_of(kueue, third) or {})
                    .get("status", {})
                    .get("conditions", [])
                    if c["type"] == "QuotaReserved"
                ),
                None,
            ),
        )
        assert reserved["status"] == "False"
        assert "nvidia.com/gpu" in reserved["message"], reserved

        pod_plane.kubectl("delete", "dpojob", "first", "-n", namespace)
        nodes = wait_for("third admitted as the quota freed", lambda: third.placed(2), 180)
        assert nodes == placements[0], "into the block the first gang left"
        assert not train_job_suspended(third)
        assert third.status().get("restarts", 0) == 0
        release_gpu_nodes(pod_plane, namespace)  # while held: no pod ever starts


def test_a_queued_hsdp_run_gets_each_shard_group_inside_one_block(
    pod_plane: ControlPlane, pod_runner: PodRunner, pod_operator: Operator, kueue: Kueue
) -> None:
    # 30B, full fine-tune, 4 nodes x 8 GPUs: hsdp 2x16, a shard group of 2 nodes. No block has
    # four H100 nodes, so the gang is split, one shard group (ranks 0-1, 2-3) per block.
    namespace = "queued-hsdp"
    kueue.open_queues(namespace)
    spec = {
        **QUEUED_GANG,
        "scheduling.topologyPolicy": "Preferred",
        "peft.enabled": False,
        "model.parameters": "30B",
        "parallelism.strategy": "hsdp",
        "resources.nodes": 4,
        "scheduling.nodeSelector": {GPU_PRODUCT_LABEL: "H100"},
    }
    with pod_runner.holding("train"):
        run = Run(pod_plane, pod_runner, namespace, "hsdp", GANG, **spec)
        wait_for("hsdp placed", lambda: run.placed(4), 180)
        pods = run.plane.core().list_namespaced_pod(
            namespace, label_selector="batch.kubernetes.io/job-name=hsdp-train-1"
        )
        template = pods.items[0].metadata.annotations or {}
        assert template.get("kueue.x-k8s.io/podset-slice-size") == "2"
        rank_block = {
            int(p.metadata.annotations["batch.kubernetes.io/job-completion-index"]): BLOCK[
                p.spec.node_name
            ]
            for p in pods.items
        }
        assert rank_block[0] == rank_block[1], rank_block
        assert rank_block[2] == rank_block[3], rank_block
        assert rank_block[0] != rank_block[2], rank_block
        workload = workload_of(kueue, run)
        assert workload is not None
        assert sorted(assigned_nodes(workload)) == sorted(p.spec.node_name for p in pods.items)
        release_gpu_nodes(pod_plane, namespace)


def test_a_run_preempted_by_kueue_resumes_from_its_checkpoint_without_spending_a_restart(
    pod_plane: ControlPlane, pod_runner: PodRunner, pod_operator: Operator, kueue: Kueue
) -> None:
    namespace = "preempted"
    kueue.open_queues(namespace)
    low = Run(
        pod_plane,
        pod_runner,
        namespace,
        "low",
        **{"scheduling.queueName": CPU_QUEUE, "scheduling.priorityClassName": LOW_PRIORITY},
    )
    first = low.pod("train")
    checkpoint = low.artifacts / "checkpoints" / "checkpoint-20" / COMPLETE_MARKER
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


def test_a_sweep_queues_its_trials_through_kueue_stops_a_hopeless_one_and_promotes_its_winner(
    pod_plane: ControlPlane, pod_runner: PodRunner, pod_operator: Operator, kueue: Kueue
) -> None:
    """Four real trials (beta x learning rate; a learning rate of 1e-9 learns nothing), two at
    a time, each queued in Kueue's CPU queue (room for one training pod): a hopeless trial is
    stopped at an evaluation once a good one has finished, the reference log-probs are
    computed once, the chooser pod compares the gated trials and only the winner is promoted."""
    namespace = "swept"
    kueue.open_queues(namespace)
    template = set_fields(
        example_manifest("quickstart"),
        **{
            "scheduling.queueName": CPU_QUEUE,
            "dpo.saveSteps": 10,  # an evaluation every 10 steps
            "evalGate.minRewardMargin": 0.0,  # the gate scores the margin with its interval
            "monitoring.intervalSeconds": 5,
            "promotion.target": "pvc://dpo-runs/promoted/swept",
        },
    )["spec"]
    volume = output_volume(pod_plane, pod_runner, namespace, template["output"]["uri"])
    sweep = {
        "apiVersion": "dpo.dev/v1alpha1",
        "kind": "DPOSweep",
        "metadata": {"name": "swept", "namespace": namespace},
        "spec": {
            "template": template,
            "parameters": [
                {"field": "dpo.beta", "values": [0.1, 0.3]},
                {"field": "dpo.learningRate", "values": [5.0e-4, 1.0e-9]},
            ],
            "maxParallel": 2,
        },
    }
    pod_plane.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(sweep))

    def sweep_status() -> dict[str, Any]:
        found = pod_plane.custom().get_namespaced_custom_object(
            "dpo.dev", "v1alpha1", namespace, "dposweeps", "swept"
        )
        status = dict(found.get("status") or {})
        assert status.get("phase") != "Failed", (status, namespace_logs(pod_runner, namespace))
        return status

    status = wait_for(
        "the sweep Succeeded",
        lambda: (s := sweep_status()).get("phase") == "Succeeded" and s,
        4 * TRAINING_TIMEOUT,
    )
    rows = {row["number"]: row for row in status["trials"]}
    stopped = [n for n, row in rows.items() if row.get("stopped")]
    assert stopped, status
    assert set(stopped) <= {2, 4}, "only a trial that learns nothing is clearly worse"
    assert status["winner"] in (1, 3)
    for number in stopped:
        assert rows[number]["phase"] == "Stopped"
        assert rows[number]["rewardMarginHigh"] < 0.01

    trials = pod_plane.custom().list_namespaced_custom_object(
        "dpo.dev", "v1alpha1", namespace, "dpojobs", label_selector="dpo.dev/sweep=swept"
    )["items"]
    reports = [
        json.loads(path.read_text())
        for trial in trials
        if (
            path := volume
            / namespace
            / trial["metadata"]["name"]
            / trial["metadata"]["uid"]
            / "train.json"
        ).exists()
    ]
    # Each train.json lists the datasets whose reference log-probs it used (train, eval).
    reused = [all(entry["reused"] for entry in report["referenceLogProbs"]) for report in reports]
    assert sorted(reused) == [False] + [True] * (len(reports) - 1), "one reference pass in all"
    for trial in trials:
        if trial["metadata"]["name"] in {f"swept-{n}" for n in stopped}:
            continue  # its Job deleted, and Kueue's Workload with it
        train = f"{trial['metadata']['name']}-train-1"
        workload = next(
            w
            for w in kueue.workloads(namespace)
            if any(o["name"] == train for o in w["metadata"].get("ownerReferences", []))
        )
        assert workload["spec"]["queueName"] == CPU_QUEUE

    winner = f"swept-{status['winner']}"
    uid = next(t["metadata"]["uid"] for t in trials if t["metadata"]["name"] == winner)
    gate = json.loads((volume / namespace / winner / uid / EVAL_REPORT).read_text())
    current = json.loads((volume / "promoted" / "swept" / CURRENT).read_text())
    assert current["digest"] == gate["adapterDigest"], "the winner's gated adapter, promoted"
    promoted = [t["metadata"]["name"] for t in trials if (t.get("status") or {}).get("promotion")]
    assert promoted == [winner], "one promotion per sweep"
    pod_plane.kubectl("delete", "namespace", namespace, "--wait=false")
