"""The rendered pods, run for real on the pod plane: kube-scheduler binds them, the pod runner
runs the trainer in them, and the run ends promoted."""

from __future__ import annotations

import json

from dpo_trainer.io.artifacts import TRAIN_REPORT

from tests.cluster.control_plane import ControlPlane, Operator
from tests.cluster.pod_plane import Run, assert_promoted_intact
from tests.cluster.pod_runner import PodRunner


def test_two_training_pods_rendezvous_across_their_own_networks(
    pod_plane: ControlPlane, pod_runner: PodRunner, pod_operator: Operator
) -> None:
    """The pod contract on a real network: rank 1 reaches rank 0 by the headless Service's name
    (MASTER_ADDR), each pod in its own network namespace with its own IP."""
    run = Run(
        pod_plane,
        pod_runner,
        "real-two-pods",
        "quickstart",
        **{"resources.nodes": 2, "dpo.maxSteps": 10, "dpo.saveSteps": 10},
    )
    status = run.wait_phase("Succeeded")
    report = json.loads((run.artifacts / TRAIN_REPORT).read_text())
    assert report["worldSize"] == 2
    pods = pod_plane.core().list_namespaced_pod(
        run.namespace, label_selector="batch.kubernetes.io/job-name=quickstart-train-1"
    )
    addresses = {p.metadata.name: p.status.pod_ip for p in pods.items}
    assert len(set(addresses.values())) == 2, addresses
    # What the collectives really ran over, measured before training: gloo's sockets out of
    # each pod's own interface, and the preflight's bandwidth between the two pods.
    fabric = report["fabricReport"]
    assert [(p["backend"], p["transport"], p["nics"]) for p in fabric["pods"]] == [
        ("gloo", "Socket", ["eth0"])
    ] * 2
    assert sorted(fabric["preflight"]["pairs"][0]["pods"]) == sorted(addresses)
    assert status["fabric"]["busBandwidthGbps"] > 0
    assert_promoted_intact(run, status)
