"""What the trainer reads of the fabric (dpo_trainer.train.fabric): NCCL's own log lines for
each transport, written from NCCL's formats (init.cc's "Using network", net_ib.cc's and
net_socket.cc's device lists, transport.cc's channel lines, aws-ofi-nccl's provider line), the
checks against the profile, the preflight's arithmetic and the straggler rule."""

from __future__ import annotations

import pytest
from dpo_contract.config import FabricConfig
from dpo_contract.reports import PairBandwidth, Preflight
from dpo_trainer.train.fabric import (
    STRAGGLER_WINDOW,
    RankTime,
    StragglerWatch,
    bus_factor,
    check_bandwidth,
    check_fabric,
    parse_nccl_log,
    sweep_sizes,
)

HEAD = "gpu-node-3:8214:8214 [0] NCCL INFO "
CHANNEL = "gpu-node-3:8214:8301 [0] NCCL INFO Channel 00/0 : "

LOGS = {
    "infiniband": [
        HEAD + "NET/IB : Using [0]mlx5_0:1/IB [1]mlx5_1:1/IB [2]mlx5_2:1/IB [3]mlx5_3:1/IB ; "
        "OOB eth0:10.0.3.7<0>",
        HEAD + "Using network IB",
        HEAD + "NET/IB : GPU Direct RDMA Enabled for HCA 0 'mlx5_0'",
        CHANNEL + "8[0] -> 0[0] [receive] via NET/IB/0/GDRDMA",
        CHANNEL + "0[0] -> 8[0] [send] via NET/IB/0/GDRDMA",
    ],
    "infiniband-no-gdr": [
        HEAD + "NET/IB : Using [0]mlx5_0:1/IB ; OOB eth0:10.0.3.7<0>",
        HEAD + "Using network IB",
        CHANNEL + "0[0] -> 8[0] [send] via NET/IB/0",
    ],
    "roce": [
        HEAD + "NET/IB : Using [0]mlx5_2:1/RoCE [1]mlx5_3:1/RoCE ; OOB net1:192.168.7.4<0>",
        HEAD + "Using network IB",
        CHANNEL + "0[0] -> 8[0] [send] via NET/IB/1(8)/GDRDMA",
    ],
    "sockets": [
        HEAD + "NET/Socket : Using [0]eth0:10.244.1.5<0> [1]eth1:10.245.1.5<0>",
        HEAD + "Using network Socket",
        CHANNEL + "0[0] -> 8[0] [send] via NET/Socket/0",
    ],
    "efa": [
        HEAD + "NET/OFI Selected Provider is efa (found 32 nics)",
        HEAD + "Using network AWS Libfabric",
        CHANNEL + "0[0] -> 8[0] [send] via NET/AWS Libfabric/0/GDRDMA",
    ],
    "tcpxo": [
        HEAD + "Using network FasTrak",
        CHANNEL + "0[0] -> 8[0] [send] via NET/FasTrak/0",
    ],
}


@pytest.mark.parametrize(
    ("log", "transport", "gdr", "nics"),
    [
        ("infiniband", "IB", True, ["mlx5_0:1", "mlx5_1:1", "mlx5_2:1", "mlx5_3:1"]),
        ("infiniband-no-gdr", "IB", False, ["mlx5_0:1"]),
        ("roce", "IB", True, ["mlx5_2:1", "mlx5_3:1"]),
        ("sockets", "Socket", False, ["eth0", "eth1"]),
        ("efa", "AWS Libfabric", True, ["efa x32"]),
        ("tcpxo", "FasTrak", False, []),
    ],
)
def test_ncc_log_says_which_transport_nics_and_gpudirect(
    log: str, transport: str, gdr: bool, nics: list[str]
) -> None:
    fabric = parse_nccl_log(LOGS[log], "train-0", "gpu-node-3")
    assert fabric is not None
    assert (fabric.transport, fabric.gpu_direct_rdma, fabric.nics) == (transport, gdr, nics)
    assert fabric.evidence, "the lines it was read from are kept"


def test_a_log_that_never_reached_the_network_says_nothing() -> None:
    assert (
        parse_nccl_log(
            [HEAD + "cudaDriverVersion 12040", HEAD + "Bootstrap : Using eth0"], "p", "n"
        )
        is None
    )


def infiniband(on_mismatch: str = "fail") -> FabricConfig:
    return FabricConfig.model_validate(
        {
            "profile": "infiniband",
            "transport": "IB",
            "gpuDirectRdma": True,
            "onMismatch": on_mismatch,
        }
    )


def test_sockets_on_an_infiniband_profile_are_named_per_pod() -> None:
    good = parse_nccl_log(LOGS["infiniband"], "train-0", "node-a")
    fallen = parse_nccl_log(LOGS["sockets"], "train-1", "node-b")
    assert good is not None
    assert fallen is not None
    (problem,) = check_fabric(infiniband(), [good, fallen], nnodes=2)
    assert "pod train-1 (node node-b): NCCL ran over Socket" in problem
    assert "network.profile infiniband needs IB" in problem


def test_no_gpudirect_between_nodes_is_a_mismatch_where_the_profile_needs_it() -> None:
    plain = parse_nccl_log(LOGS["infiniband-no-gdr"], "train-1", "node-b")
    assert plain is not None
    (problem,) = check_fabric(infiniband(), [plain], nnodes=2)
    assert "without GPUDirect RDMA" in problem
    # One node: no traffic between nodes, nothing to judge.
    assert check_fabric(infiniband(), [plain], nnodes=1) == []


def test_bus_bandwidth_is_counted_as_nccl_tests_counts_it() -> None:
    assert bus_factor("all_reduce", 8) == pytest.approx(2 * 7 / 8)
    assert bus_factor("all_gather", 8) == pytest.approx(7 / 8)
    assert bus_factor("all_reduce", 1) == 0


def test_the_sweep_has_four_sizes_up_to_the_maximum_each_whole_per_rank() -> None:
    sizes = sweep_sizes(256 << 20, world=16)
    assert sizes == [4 << 20, 16 << 20, 64 << 20, 256 << 20]
    assert all(size % (4 * 3) == 0 for size in sweep_sizes(1000, world=3))


def test_a_slow_preflight_names_the_slowest_pair_of_nodes() -> None:
    preflight = Preflight.model_validate(
        {
            "worldSize": 4,
            "seconds": 3.0,
            "collectives": [
                {
                    "collective": "all_reduce",
                    "bytes": 1 << 20,
                    "seconds": 0.01,
                    "algorithmGbps": 0.1,
                    "busGbps": 0.15,
                },
                {
                    "collective": "all_reduce",
                    "bytes": 4 << 20,
                    "seconds": 0.4,
                    "algorithmGbps": 0.01,
                    "busGbps": 0.015,
                },
            ],
            "pairs": [
                PairBandwidth(pods=["t-0", "t-1"], nodes=["a", "b"], bytes=4 << 20, gbps=1.2),
                PairBandwidth(pods=["t-1", "t-2"], nodes=["b", "c"], bytes=4 << 20, gbps=0.004),
            ],
        }
    )
    config = infiniband().model_copy(update={"min_bus_bandwidth_gbps": 0.1})
    message = check_bandwidth(config, preflight)
    assert message is not None
    assert (
        "0.015 GB/s of bus bandwidth, below network.preflight.minBusBandwidthGBps (0.1)" in message
    )
    assert "slowest pair of nodes is b and c (pods t-1 and t-2)" in message
    assert (
        check_bandwidth(config.model_copy(update={"min_bus_bandwidth_gbps": 0.01}), preflight)
        is None
    )


def times(seconds: list[float]) -> list[RankTime]:
    return [
        RankTime(rank, f"t-{rank // 2}", f"node-{rank // 2}", s) for rank, s in enumerate(seconds)
    ]


def test_a_rank_consistently_slower_than_the_others_is_named_a_straggler() -> None:
    watch = StragglerWatch(factor=1.5)
    slow = [0.02, 0.021, 0.019, 0.07]
    for _ in range(STRAGGLER_WINDOW - 1):
        assert watch.observe(times(slow)) == []
    ((named, ratio),) = watch.observe(times(slow))
    assert (named.rank, named.pod, named.node) == (3, "t-1", "node-1")
    assert ratio == pytest.approx(0.07 / 0.02, rel=0.01)


def test_one_slow_probe_is_not_a_straggler() -> None:
    watch = StragglerWatch(factor=1.5)
    for seconds in ([0.02, 0.02, 0.02, 0.07], [0.02, 0.02, 0.02, 0.021], [0.02, 0.02, 0.02, 0.07]):
        assert watch.observe(times(seconds)) == []
    # Two ranks: each is judged against the other, not against a median it takes part in.
    pair = StragglerWatch(factor=1.5)
    found = [pair.observe(times([0.02, 0.05])) for _ in range(STRAGGLER_WINDOW)]
    assert [entry.rank for entry, _ in found[-1]] == [1]
