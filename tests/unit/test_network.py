"""Network profiles: each fabric gets the NCCL variables and pod pieces its vendor documents."""

from __future__ import annotations

import json
from typing import Any

import pytest
from dpo_contract.config import TrainerConfig
from dpo_operator.api import NetworkSpec
from dpo_operator.core.network import fabric_problems, network_pieces
from dpo_operator.core.render import render_config_map, render_training_job
from dpo_operator.core.resolve import resolve
from pydantic import ValidationError

from tests.conftest import example, job_with

IB_HCAS = [f"mlx5_{i}" for i in range(8)]


@pytest.mark.parametrize(
    ("network", "node_selector", "expected_env"),
    [
        (
            {"profile": "tcp"},
            {},
            {"NCCL_NET": "Socket", "NCCL_IB_DISABLE": "1", "NCCL_SOCKET_IFNAME": "^lo,docker"},
        ),
        (
            # NVIDIA's NCCL docs: `=` makes the HCA list exact, each HCA with its port.
            {"profile": "infiniband", "rdmaDevices": 8, "hcas": IB_HCAS},
            {},
            {
                "NCCL_NET": "IB",
                "NCCL_IB_HCA": "=" + ",".join(f"{hca}:1" for hca in IB_HCAS),
                "NCCL_NET_GDR_LEVEL": "SYS",
                "NCCL_IB_DISABLE": "0",
            },
        ),
        (
            # Azure's ND H100 v5: eight NDR ports named mlx5_ib0..7 by its HPC images.
            {"profile": "infiniband"},
            {"node.kubernetes.io/instance-type": "Standard_ND96isr_H100_v5"},
            {"NCCL_IB_HCA": "=" + ",".join(f"mlx5_ib{i}:1" for i in range(8))},
        ),
        (
            {
                "profile": "roce",
                "secondaryNetworks": ["roce-a"],
                "rdmaDevices": 2,
                "hcas": ["mlx5_2", "mlx5_3:2"],
            },
            {},
            {
                "NCCL_IB_HCA": "=mlx5_2:1,mlx5_3:2",
                "NCCL_SOCKET_IFNAME": "net1",
                "NCCL_NET_GDR_LEVEL": "SYS",
            },
        ),
        (
            # The AWS EFA user guide's variables for NCCL over the aws-ofi-nccl plugin.
            {"profile": "efa"},
            {"node.kubernetes.io/instance-type": "p5.48xlarge"},
            {
                "NCCL_NET": "AWS Libfabric",
                "FI_PROVIDER": "efa",
                "FI_EFA_USE_DEVICE_RDMA": "1",
                "FI_EFA_FORK_SAFE": "1",
            },
        ),
        (
            # GKE's GPUDirect-TCPXO guide (A3 Mega): the FasTrak plugin from the node's driver
            # directory, put first on the library path by the launcher.
            {"profile": "tcpxo", "secondaryNetworks": [f"vpc{i}" for i in range(1, 9)]},
            {"node.kubernetes.io/instance-type": "a3-megagpu-8g"},
            {
                "NCCL_NET": "FasTrak",
                "DPO_LIBRARY_PATH": "/usr/local/nvidia/lib64",
                "NCCL_FASTRAK_CTRL_DEV": "eth0",
                "NCCL_FASTRAK_IFNAME": "eth1,eth2,eth3,eth4,eth5,eth6,eth7,eth8",
                "NCCL_FASTRAK_USE_LLCM": "1",
                "NCCL_FASTRAK_NUM_FLOWS": "2",
                "NCCL_CROSS_NIC": "0",
                "NCCL_PROTO": "Simple,LL128",
                "NCCL_TUNER_CONFIG_PATH": "/usr/local/nvidia/lib64/a3plus_tuner_config.textproto",
            },
        ),
    ],
    ids=["tcp", "infiniband", "infiniband-nd-h100-v5", "roce", "efa-p5", "tcpxo-a3-mega"],
)
def test_each_profile_renders_its_providers_documented_values(
    network: dict[str, object], node_selector: dict[str, str], expected_env: dict[str, str]
) -> None:
    env = network_pieces(NetworkSpec.model_validate(network), 8, node_selector).env
    assert expected_env.items() <= env.items()
    # Every profile aborts a failed or hung collective so the group can be restarted; NCCL
    # stays at WARN (the trainer raises one process per pod to INFO to read the transport).
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert env["NCCL_DEBUG"] == "WARN"


def test_roce_leaves_the_gid_to_nccl_unless_set() -> None:
    roce = {"profile": "roce", "secondaryNetworks": ["a"], "rdmaDevices": 1, "hcas": ["mlx5_0"]}
    assert "NCCL_IB_GID_INDEX" not in network_pieces(NetworkSpec.model_validate(roce), 8).env
    pinned = NetworkSpec.model_validate({**roce, "gidIndex": 5})
    assert network_pieces(pinned, 8).env["NCCL_IB_GID_INDEX"] == "5"


def test_user_overrides_win_over_the_profile() -> None:
    spec = NetworkSpec.model_validate(
        {
            "profile": "infiniband",
            "rdmaDevices": 2,
            "hcas": ["mlx5_0"],
            "env": {"NCCL_IB_HCA": "=mlx5_0,mlx5_1", "NCCL_DEBUG": "INFO"},
        }
    )
    env = network_pieces(spec, 8).env
    assert env["NCCL_IB_HCA"] == "=mlx5_0,mlx5_1"
    assert env["NCCL_DEBUG"] == "INFO"


@pytest.mark.parametrize(
    ("profile", "instance", "resource", "devices"),
    [
        ("efa", "p5.48xlarge", "vpc.amazonaws.com/efa", "32"),
        ("efa", "p5en.48xlarge", "vpc.amazonaws.com/efa", "16"),
        ("efa", "p4d.24xlarge", "vpc.amazonaws.com/efa", "4"),
        ("infiniband", "Standard_ND96isr_H100_v5", "rdma/ib", "8"),
    ],
)
def test_rdma_devices_come_from_the_instance_type(
    profile: str, instance: str, resource: str, devices: str
) -> None:
    """A p5.48xlarge pod gets all 32 EFA interfaces, not one."""
    pieces = network_pieces(
        NetworkSpec.model_validate({"profile": profile}),
        8,
        {"node.kubernetes.io/instance-type": instance},
    )
    assert pieces.resources == {resource: devices}
    assert pieces.capabilities == ("IPC_LOCK",)


def test_rdma_resource_name_can_be_changed_for_other_device_plugins() -> None:
    spec = NetworkSpec.model_validate(
        {
            "profile": "roce",
            "rdmaResource": "rdma/rdma_shared_device_a",
            "secondaryNetworks": ["a"],
            "rdmaDevices": 1,
            "hcas": ["mlx5_0"],
        }
    )
    assert network_pieces(spec, 8).resources == {"rdma/rdma_shared_device_a": "1"}


@pytest.mark.parametrize(
    ("network", "node_selector", "fields"),
    [
        ({"profile": "infiniband"}, {}, ["network.rdmaDevices", "network.hcas"]),
        (
            {"profile": "efa"},
            {"node.kubernetes.io/instance-type": "g5.48xlarge"},
            ["network.rdmaDevices"],
        ),
        ({"profile": "efa"}, {"node.kubernetes.io/instance-type": "p5.48xlarge"}, []),
        ({"profile": "infiniband", "rdmaDevices": 8}, {}, ["network.hcas"]),
        (
            {"profile": "tcpxo", "secondaryNetworks": ["a", "b", "c", "d"]},
            {"node.kubernetes.io/instance-type": "a3-megagpu-8g"},
            ["network.secondaryNetworks"],
        ),
        ({"profile": "tcp"}, {}, []),
    ],
)
def test_what_a_profile_needs_and_no_table_gives_is_refused_by_field(
    network: dict[str, object], node_selector: dict[str, str], fields: list[str]
) -> None:
    problems = fabric_problems(NetworkSpec.model_validate(network), node_selector)
    assert [problem.split(":")[0] for problem in problems] == fields
    job = {"network": network, "scheduling": {"nodeSelector": node_selector}}
    if fields:
        with pytest.raises(ValidationError) as refused:
            job_with(**job)
        assert all(field in str(refused.value) for field in fields)
    else:
        job_with(**job)


def test_roce_attaches_the_secondary_network_through_multus() -> None:
    pod = render_training_job(resolve(example("kueue-queued")), 1)["spec"]["template"]
    assert pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == "roce-net-a"
    assert "IPC_LOCK" in pod["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]


def test_tcpxo_runs_its_daemon_as_a_native_sidecar_with_gke_annotations() -> None:
    pod = render_training_job(resolve(example("tcpxo")), 1)["spec"]["template"]
    (daemon,) = pod["spec"]["initContainers"]
    assert daemon["name"] == "tcpxo-daemon"
    # A native sidecar (restartPolicy Always) lets the Job complete when the trainer exits.
    assert daemon["restartPolicy"] == "Always"
    assert "--num_nics=8" in daemon["args"][0]
    annotations = pod["metadata"]["annotations"]
    interfaces = json.loads(annotations["networking.gke.io/interfaces"])
    assert interfaces[0] == {"interfaceName": "eth0", "network": "default"}
    assert [i["network"] for i in interfaces[1:]] == [f"vpc{i}" for i in range(1, 9)]
    assert "- path: /dev/nvidia7\n" in annotations["devices.gke.io/container.tcpxo-daemon"]
    mounts = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert {"/usr/local/nvidia", "/dev/aperture_devices"} <= mounts


def rendered_training(job: Any) -> Any:
    config = TrainerConfig.model_validate_json(
        render_config_map(resolve(job))["data"]["trainer.json"]
    )
    return config.training


def test_the_step_and_transfer_timeouts_reach_the_trainer_apart() -> None:
    training = rendered_training(
        job_with(network={"collectiveTimeoutSeconds": 120, "transferTimeoutSeconds": 7200})
    )
    assert (training.step_timeout_seconds, training.transfer_timeout_seconds) == (120, 7200)


def test_the_transfer_timeout_defaults_to_the_models_bytes() -> None:
    """A 70B full fine-tune on 4 pods downloads 141 GB of model and sends a 212 GB share of
    each checkpoint (fp32 weights and two moments, a quarter each): 30 minutes plus about 56
    minutes at 100 MiB/s. The steps keep 10 minutes."""
    seventy = rendered_training(
        job_with(
            model={"name": "meta-llama/Llama-3.3-70B-Instruct"},
            peft={"enabled": False},
            resources={"nodes": 4, "gpusPerNode": 8},
        )
    )
    tiny = rendered_training(job_with())
    print(f"70B: {seventy.transfer_timeout_seconds} s, tiny: {tiny.transfer_timeout_seconds} s")
    assert seventy.step_timeout_seconds == tiny.step_timeout_seconds == 600
    assert 5000 <= seventy.transfer_timeout_seconds <= 5300
    assert 1800 <= tiny.transfer_timeout_seconds < 1900
