"""Network profiles: each fabric gets the NCCL variables and pod pieces its vendor documents."""

from __future__ import annotations

import json
from typing import Any

import pytest
from dpo_contract.config import TrainerConfig
from dpo_operator.api import NetworkSpec
from dpo_operator.core.network import network_pieces
from dpo_operator.core.render import render_config_map, render_training_job
from dpo_operator.core.resolve import resolve

from tests.conftest import example, job_with


@pytest.mark.parametrize(
    ("network", "expected_env"),
    [
        ({"profile": "tcp"}, {"NCCL_IB_DISABLE": "1", "NCCL_SOCKET_IFNAME": "^lo,docker"}),
        (
            {"profile": "infiniband"},
            {"NCCL_IB_HCA": "mlx5", "NCCL_NET_GDR_LEVEL": "SYS", "NCCL_IB_DISABLE": "0"},
        ),
        (
            {"profile": "roce", "secondaryNetworks": ["roce-a"]},
            {"NCCL_IB_GID_INDEX": "3", "NCCL_SOCKET_IFNAME": "net1", "NCCL_NET_GDR_LEVEL": "SYS"},
        ),
        (
            {"profile": "efa"},
            {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "FI_EFA_FORK_SAFE": "1"},
        ),
        (
            {"profile": "tcpxo", "secondaryNetworks": [f"vpc{i}" for i in range(1, 9)]},
            {
                "NCCL_FASTRAK_CTRL_DEV": "eth0",
                "NCCL_FASTRAK_IFNAME": "eth1,eth2,eth3,eth4,eth5,eth6,eth7,eth8",
                "NCCL_FASTRAK_USE_LLCM": "1",
                "NCCL_CROSS_NIC": "0",
            },
        ),
    ],
    ids=lambda value: value.get("profile", "") if isinstance(value, dict) else "",
)
def test_each_profile_sets_its_fabric_variables(
    network: dict[str, object], expected_env: dict[str, str]
) -> None:
    env = network_pieces(NetworkSpec.model_validate(network), 8).env
    assert expected_env.items() <= env.items()
    # Every profile aborts a failed or hung collective so the group can be restarted.
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"


def test_user_overrides_win_over_the_profile() -> None:
    spec = NetworkSpec.model_validate(
        {"profile": "infiniband", "env": {"NCCL_IB_HCA": "=mlx5_0,mlx5_1", "NCCL_DEBUG": "INFO"}}
    )
    env = network_pieces(spec, 8).env
    assert env["NCCL_IB_HCA"] == "=mlx5_0,mlx5_1"
    assert env["NCCL_DEBUG"] == "INFO"


@pytest.mark.parametrize(
    ("profile", "resource"),
    [("infiniband", "rdma/ib"), ("roce", "rdma/roce"), ("efa", "vpc.amazonaws.com/efa")],
)
def test_rdma_profiles_request_their_device_and_lock_memory(profile: str, resource: str) -> None:
    spec = NetworkSpec.model_validate(
        {"profile": profile, "rdmaDevices": 4, "secondaryNetworks": ["net-a"]}
    )
    pieces = network_pieces(spec, 8)
    assert pieces.resources == {resource: "4"}
    assert pieces.capabilities == ("IPC_LOCK",)


def test_rdma_resource_name_can_be_changed_for_other_device_plugins() -> None:
    spec = NetworkSpec.model_validate(
        {"profile": "roce", "rdmaResource": "rdma/rdma_shared_device_a", "secondaryNetworks": ["a"]}
    )
    assert network_pieces(spec, 8).resources == {"rdma/rdma_shared_device_a": "1"}


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
