"""The fabric under real pods: one node's link slowed (htb) or its CPUs capped (a CFS quota) on
the pod plane, and the run names it: a preflight below the floor fails before anything is
loaded (FabricSlow, with the slowest pair of nodes), a rank slower than the others is reported
as a Straggler with its pod and node while the run trains on."""

from __future__ import annotations

import json
from typing import Any

from dpo_trainer.io.artifacts import TRAIN_REPORT

from tests.cluster.control_plane import ControlPlane, Operator
from tests.cluster.pod_plane import Run, in_pool
from tests.cluster.pod_runner import PodRunner


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status.get("conditions", []) if c["type"] == kind)


def test_a_slow_link_fails_the_preflight_naming_the_slow_node(
    pod_plane: ControlPlane, pod_runner: PodRunner, pod_operator: Operator
) -> None:
    """link-slow's pod sends and receives at 20 Mbit/s (2.5 MB/s); the floor is 50 MB/s of bus
    bandwidth, far under what the bridge carries between healthy pods."""
    run = Run(
        pod_plane,
        pod_runner,
        "fabric-slow-link",
        "slow-link",
        **{
            "resources.nodes": 2,
            "network.preflight": {"maxMessageMiB": 1, "minBusBandwidthGBps": 0.05},
            **in_pool("slow-link"),
        },
    )
    status = run.wait_phase("Failed")
    assert run.placed(2) == ["link-ok", "link-slow"]
    failed = condition(status, "Failed")
    assert failed["reason"] == "FabricSlow", failed
    message = failed["message"]
    assert "below network.preflight.minBusBandwidthGBps (0.05)" in message, message
    assert "the slowest pair of nodes is link-" in message, message
    assert "link-slow" in message, message
    assert (status.get("restarts") or 0) == 0, "a fabric too slow is not retried on the same nodes"


def test_a_capped_node_is_named_a_straggler_while_the_run_trains_on(
    pod_plane: ControlPlane, pod_runner: PodRunner, pod_operator: Operator
) -> None:
    """cpu-slow's pod gets half a CPU: every rank waits for it at every collective, and its
    probe is several times the other's, so it is the one named."""
    run = Run(
        pod_plane,
        pod_runner,
        "fabric-straggler",
        "straggler",
        **{
            "resources.nodes": 2,
            "dpo.maxSteps": 8,
            "dpo.loggingSteps": 1,
            "dpo.saveSteps": 8,
            "evalGate.enabled": False,
            "promotion": None,
            **in_pool("slow-cpu"),
        },
    )
    status = run.wait_phase("Succeeded")
    assert run.placed(2) == ["cpu-ok", "cpu-slow"]
    probes = json.loads((run.artifacts / TRAIN_REPORT).read_text())["computeByRank"]
    print(probes)
    slow, healthy = sorted(probes, key=lambda probe: probe["node"] != "cpu-slow")
    assert slow["medianSeconds"] > 1.5 * healthy["medianSeconds"]
    degraded = condition(status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "Straggler"), degraded
    assert "on node cpu-slow" in degraded["message"], degraded
    assert "(pod straggler-train-1-" in degraded["message"], degraded
    fabric = status["fabric"]
    assert fabric["transport"] == "Socket"
    assert fabric["nics"] == ["eth0"]
    assert fabric["busBandwidthGbps"] > 0
