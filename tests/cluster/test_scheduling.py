"""Placement by the real kube-scheduler, never by the test: GPU Nodes with GPU and RDMA capacity,
a GPU taint and topology-block labels; the DPOJob's nodeSelector, tolerations and topologyKey
are what the scheduler obeys. The GPU pods are held (not started): their trainer needs CUDA."""

from __future__ import annotations

from typing import Any

from tests.cluster.control_plane import ControlPlane, Operator, wait_for
from tests.cluster.pod_plane import BLOCK_LABEL, GPU_PRODUCT_LABEL, GPU_TAINT, NODES, Run
from tests.cluster.pod_runner import PodRunner

BLOCK = {n.name: n.labels.get(BLOCK_LABEL) for n in NODES}
PRODUCT = {n.name: n.labels.get(GPU_PRODUCT_LABEL) for n in NODES}
SPEC: dict[str, Any] = {
    # What is tested is placement; the hub the initializer would resolve is out of reach here.
    "model.initialize": False,
    "scheduling.tolerations": [
        {"key": GPU_TAINT["key"], "operator": "Exists", "effect": GPU_TAINT["effect"]}
    ],
    "scheduling.nodeSelector": {GPU_PRODUCT_LABEL: "H100"},
    "scheduling.topologyKey": BLOCK_LABEL,
    "promotion.target": "pvc://dpo-checkpoints/promoted/llama",
}


def stalled(run: Run) -> dict[str, Any] | None:
    conditions = run.status().get("conditions") or []
    return next((c for c in conditions if c["type"] == "Stalled" and c["status"] == "True"), None)


def test_the_scheduler_packs_each_gang_into_one_block_of_the_selected_gpu_nodes(
    pod_plane: ControlPlane, pod_runner: PodRunner, pod_operator: Operator
) -> None:
    example = "llama-8b-lora-infiniband"  # 2 nodes x 8 GPUs, rdma/ib, the GPU toleration
    with pod_runner.holding("train"):
        first = Run(pod_plane, pod_runner, "placement", "first", example, **SPEC)
        first_nodes = wait_for("first placed", lambda: first.placed(2))
        second = Run(pod_plane, pod_runner, "placement", "second", example, **SPEC)
        second_nodes = wait_for("second placed", lambda: second.placed(2))
        for nodes in (first_nodes, second_nodes):
            assert {PRODUCT[n] for n in nodes} == {"H100"}, "the nodeSelector holds"
            assert len({BLOCK[n] for n in nodes}) == 1, f"one gang, one block: {nodes}"
        # 8 GPUs a node: the two gangs fill both blocks' H100 nodes, the A100 left alone.
        assert sorted(first_nodes + second_nodes) == ["gpu-a-0", "gpu-a-1", "gpu-b-0", "gpu-b-1"]

        third = Run(pod_plane, pod_runner, "placement", "third", example, **SPEC)
        condition = wait_for("third stalled", lambda: stalled(third))
        assert "Insufficient nvidia.com/gpu" in condition["message"], condition
        untolerated = Run(
            pod_plane,
            pod_runner,
            "placement",
            "untolerated",
            example,
            **{**SPEC, "scheduling.tolerations": []},
        )
        condition = wait_for("untolerated stalled", lambda: stalled(untolerated))
        assert "untolerated taint" in condition["message"], condition
    pod_plane.kubectl("delete", "namespace", "placement", "--wait=false")


def test_a_gang_no_block_can_ever_hold_is_refused_before_its_training_job_exists(
    pod_plane: ControlPlane, pod_runner: PodRunner, pod_operator: Operator
) -> None:
    """Three 8-GPU pods, Required in one block of H100 nodes: each block has two. The operator
    reads the Nodes (their labels and allocatable GPUs) and fails the run at once, instead of a
    gang that would wait in the scheduler (or Kueue) for ever."""
    run = Run(
        pod_plane,
        pod_runner,
        "placement-too-big",
        "three",
        "llama-8b-lora-infiniband",
        **{**SPEC, "resources.nodes": 3, "scheduling.topologyPolicy": "Required"},
    )
    status = run.wait_phase("Failed", timeout=60)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "TopologyUnsatisfiable"
    assert (
        f"no {BLOCK_LABEL} domain can ever hold the 3 training pods of 8 nvidia.com/gpu: the "
        "largest, b, has 16 in all, room for 2" in failed["message"]
    ), failed
    assert pod_plane.batch().list_namespaced_job("placement-too-big").items == []
    pod_plane.kubectl("delete", "namespace", "placement-too-big", "--wait=false")
