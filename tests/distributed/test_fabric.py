"""The fabric as the trainer measures it, on CPU over gloo: what it really ran over and the
preflight's bandwidth recorded (train.json, the termination message), and a transport that is
not the profile's failing the run before anything is loaded, or only reported (onMismatch: warn)."""

from __future__ import annotations

from pathlib import Path

from tests.distributed.conftest import DDP_TWO_PODS, HSDP, Run, distributed_job, launch

# What an infiniband profile expects; CPU pods speak gloo over sockets.
INFINIBAND = {"profile": "infiniband", "transport": "IB", "gpu_direct_rdma": True}


def test_the_fabric_and_the_preflight_are_recorded(runs: dict[tuple[str, str], Run]) -> None:
    """hsdp on 2 pods x 2 processes: the first process of each pod says what its collectives
    left by; every rank ran the sweep (4 sizes, all-reduce and all-gather) and the pods' first
    processes sent each other the largest message."""
    run = runs[("hsdp", "full")]
    fabric = run.summary()["fabricReport"]
    assert [(p["pod"], p["backend"], p["transport"], p["nics"]) for p in fabric["pods"]] == [
        ("pod-0", "gloo", "Socket", ["lo"]),
        ("pod-1", "gloo", "Socket", ["lo"]),
    ]
    preflight = fabric["preflight"]
    assert preflight["worldSize"] == HSDP.world_size
    sizes = sorted({c["bytes"] for c in preflight["collectives"]})
    assert len(sizes) == 4
    assert sizes[-1] == 4 << 20  # the CPU default maximum
    assert {c["collective"] for c in preflight["collectives"]} == {"all_reduce", "all_gather"}
    assert all(c["busGbps"] > 0 for c in preflight["collectives"])
    (pair,) = preflight["pairs"]
    assert (pair["pods"], pair["bytes"]) == (["pod-0", "pod-1"], 4 << 20)
    summary = run.termination()["fabric"]
    assert summary["transport"] == "Socket"
    assert summary["busBandwidthGbps"] > 0
    assert summary["slowestPair"].startswith("pod-0 <-> pod-1")


def test_a_transport_not_the_profiles_fails_before_anything_is_loaded(tmp_path: Path) -> None:
    run = launch(distributed_job(DDP_TWO_PODS, lora=True), tmp_path, fabric=INFINIBAND)
    assert run.codes == [4, 4]
    said = run.termination()
    print(said["message"])
    assert said["reason"] == "FabricMismatch"
    assert "pod pod-0 (node " in said["message"]
    assert "gloo ran over Socket" in said["message"]
    assert "network.profile infiniband needs IB" in said["message"]
    assert not (run.artifacts / "checkpoints").exists()
    assert not (run.artifacts / "train.json").exists()


def test_on_mismatch_warn_trains_on_and_reports_it(tmp_path: Path) -> None:
    job = distributed_job(DDP_TWO_PODS, lora=True)
    job.spec.dpo.max_steps = 2
    run = launch(job, tmp_path, fabric={**INFINIBAND, "on_mismatch": "warn"})
    run.assert_succeeded()
    (signal,) = [s for s in run.summary()["health"] if s["reason"] == "FabricMismatch"]
    assert "gloo ran over Socket" in signal["message"]
    assert run.termination()["health"][0]["reason"] == "FabricMismatch"
