"""Network profiles: the NCCL/libfabric variables and pod pieces each GPU fabric needs.

Each profile follows its vendor's reference manifests (NVIDIA network operator for InfiniBand and
RoCE, the AWS EFA device plugin, GKE's GPUDirect-TCPXO guide). Each pins `NCCL_NET`, so a missing
transport or plugin fails at start instead of falling back to TCP at a fraction of the speed.
The user's `network.env` is applied last, so an override always wins.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dpo_contract.config import Transport
from dpo_contract.pod import ENV_LIBRARY_PATH

from dpo_operator.api import NetworkSpec

# Every profile: abort a rank whose collective failed or hung instead of hanging the whole job
# (torch then tears the process down so the pod fails and the group is restarted). The hang
# timeout itself is the trainer's step timeout: NCCL has no timeout variable of its own. NCCL
# stays quiet; the trainer raises the first process of each pod to INFO for the INIT and NET
# subsystems and reads from that log which transport NCCL really used.
COMMON_ENV = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
    "NCCL_DEBUG": "WARN",
}

# The pod's primary interface carries the rendezvous and, with tcp, the collectives too.
_NOT_LOOPBACK = "^lo,docker"


# The TCPXO receive-datapath daemon runs with NET_ADMIN and the host's /sys and /proc/sys, so its
# image is the cluster admin's choice (an operator setting), never a DPOJob's.
DEFAULT_TCPXO_DAEMON_IMAGE = (
    "us-docker.pkg.dev/gce-ai-infra/gpudirect-tcpxo/tcpgpudmarxd-dev:v1.0.14"
)

_TCPXO_LIBRARIES = "/usr/local/nvidia"
_TCPXO_APERTURE = "/dev/aperture_devices"


@dataclass(frozen=True)
class NetworkPieces:
    """What a network profile adds to a training pod."""

    env: dict[str, str]
    resources: dict[str, str] = field(default_factory=dict)
    capabilities: tuple[str, ...] = ()
    annotations: dict[str, str] = field(default_factory=dict)
    sidecars: tuple[dict[str, Any], ...] = ()
    volumes: tuple[dict[str, Any], ...] = ()
    trainer_mounts: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class KnownInstance:
    """The GPU NICs of an instance type, from its provider's documentation: RDMA devices a pod
    gets (EFA interfaces, IB ports), the HCAs NCCL must use, and GPU NICs of a TCPXO machine."""

    rdma_devices: int | None = None
    hcas: tuple[str, ...] = ()
    gpu_nics: int | None = None


def _azure_hcas() -> tuple[str, ...]:
    # Azure's HPC images name the eight InfiniBand ports of ND v4/v5 mlx5_ib0..mlx5_ib7.
    return tuple(f"mlx5_ib{i}" for i in range(8))


# Keyed on node.kubernetes.io/instance-type (lowercase), the label every provider sets.
KNOWN_INSTANCES: dict[str, KnownInstance] = {
    "p5.48xlarge": KnownInstance(rdma_devices=32),
    "p5e.48xlarge": KnownInstance(rdma_devices=32),
    "p5en.48xlarge": KnownInstance(rdma_devices=16),
    "p4d.24xlarge": KnownInstance(rdma_devices=4),
    "p4de.24xlarge": KnownInstance(rdma_devices=4),
    "standard_nd96isr_h100_v5": KnownInstance(rdma_devices=8, hcas=_azure_hcas()),
    "standard_nd96isr_h200_v5": KnownInstance(rdma_devices=8, hcas=_azure_hcas()),
    "standard_nd96asr_v4": KnownInstance(rdma_devices=8, hcas=_azure_hcas()),
    "standard_nd96amsr_a100_v4": KnownInstance(rdma_devices=8, hcas=_azure_hcas()),
    "a3-megagpu-8g": KnownInstance(gpu_nics=8),
}
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"


def known_instance(node_selector: dict[str, str]) -> KnownInstance | None:
    instance = node_selector.get(INSTANCE_TYPE_LABEL)
    return KNOWN_INSTANCES.get(instance.lower()) if instance else None


@dataclass(frozen=True)
class Node:
    """What a profile needs to know of the pod's node besides the DPOJob's network spec."""

    gpus: int
    known: KnownInstance | None = None
    tcpxo_daemon_image: str = DEFAULT_TCPXO_DAEMON_IMAGE


@dataclass(frozen=True)
class NetworkProfile:
    """A fabric DPOJobs may name in `spec.network.profile`: the pieces it adds to a training
    pod, the RDMA device resource its pods request by default, and, for a profile whose pods
    reach into the node, why (the admin then allows it per namespace)."""

    pieces: Callable[[NetworkSpec, Node], NetworkPieces]
    transport: Transport
    gpu_direct_rdma: bool = False
    rdma_resource: str | None = None
    needs_hcas: bool = False
    host_access: str | None = None


def network_pieces(
    network: NetworkSpec,
    gpus_per_node: int,
    node_selector: dict[str, str] | None = None,
    tcpxo_daemon_image: str = DEFAULT_TCPXO_DAEMON_IMAGE,
) -> NetworkPieces:
    """The env, resources and pod pieces of `network.profile`, with the user's env on top."""
    node = Node(gpus_per_node, known_instance(node_selector or {}), tcpxo_daemon_image)
    pieces = PROFILES[network.profile].pieces(network, node)
    env = {**COMMON_ENV, **pieces.env, **network.env}
    return NetworkPieces(
        env=env,
        resources=pieces.resources,
        capabilities=pieces.capabilities,
        annotations=pieces.annotations,
        sidecars=pieces.sidecars,
        volumes=pieces.volumes,
        trainer_mounts=pieces.trainer_mounts,
    )


def fabric_problems(network: NetworkSpec, node_selector: dict[str, str]) -> list[str]:
    """What the profile needs that neither the spec nor a known instance type gives."""
    profile = PROFILES[network.profile]
    known = known_instance(node_selector)
    instance = f"scheduling.nodeSelector's {INSTANCE_TYPE_LABEL}"
    types = ", ".join(name for name, k in KNOWN_INSTANCES.items() if k.rdma_devices)
    problems = []
    if (
        profile.rdma_resource
        and network.rdma_devices is None
        and not (known and known.rdma_devices)
    ):
        problems.append(
            f"network.rdmaDevices: required for the {network.profile} profile (the RDMA "
            "devices each pod gets: all of the node's GPU NICs, or NCCL runs on fewer): set it, "
            f"or name one of these instance types in {instance}: {types}"
        )
    if profile.needs_hcas and not network.hcas and not (known and known.hcas):
        problems.append(
            f"network.hcas: required for the {network.profile} profile: list the GPU NICs' "
            "HCAs (ibv_devinfo on a node shows them, e.g. [mlx5_0, mlx5_1, ...]); a prefix would "
            "also match the node's front-end and storage NICs"
        )
    nics = known.gpu_nics if known else None
    if network.profile == "tcpxo" and nics and len(network.secondary_networks) != nics:
        problems.append(
            f"network.secondaryNetworks: {node_selector[INSTANCE_TYPE_LABEL]} has {nics} "
            f"GPU NICs, one GKE network each; {len(network.secondary_networks)} are listed"
        )
    return problems


def _rdma_resource(network: NetworkSpec, node: Node) -> dict[str, str]:
    name = network.rdma_resource or PROFILES[network.profile].rdma_resource
    assert name is not None, f"the {network.profile} profile requests no RDMA devices"
    devices = network.rdma_devices or (node.known.rdma_devices if node.known else None)
    assert devices is not None, "validation requires spec.network.rdmaDevices"
    return {name: str(devices)}


def _exact_hcas(network: NetworkSpec, node: Node) -> str:
    """NCCL's exact-match HCA list: `=mlx5_0:1,mlx5_1:1` (port 1 unless given)."""
    hcas = network.hcas or list(node.known.hcas if node.known else ())
    assert hcas, "validation requires spec.network.hcas"
    return "=" + ",".join(hca if ":" in hca else f"{hca}:1" for hca in hcas)


def _tcp(network: NetworkSpec, node: Node) -> NetworkPieces:
    return NetworkPieces(
        env={"NCCL_NET": "Socket", "NCCL_SOCKET_IFNAME": _NOT_LOOPBACK, "NCCL_IB_DISABLE": "1"}
    )


def _infiniband(network: NetworkSpec, node: Node) -> NetworkPieces:
    return NetworkPieces(
        env={
            "NCCL_NET": "IB",
            "NCCL_IB_DISABLE": "0",
            "NCCL_IB_HCA": _exact_hcas(network, node),
            # GPUDirect RDMA across the PCIe root complex: NIC reads GPU memory directly.
            "NCCL_NET_GDR_LEVEL": "SYS",
            "NCCL_IB_PCI_RELAXED_ORDERING": "1",
            "NCCL_SOCKET_IFNAME": "eth0",
        },
        resources=_rdma_resource(network, node),
        # Registering GPU and host memory with the HCA pins pages.
        capabilities=("IPC_LOCK",),
    )


def _roce(network: NetworkSpec, node: Node) -> NetworkPieces:
    # NCCL picks the RoCE v2 GID of each port itself (2.21+); a fixed index is only right on
    # the nodes whose GID table it was read from.
    gid = {} if network.gid_index is None else {"NCCL_IB_GID_INDEX": str(network.gid_index)}
    return NetworkPieces(
        env={
            "NCCL_NET": "IB",
            "NCCL_IB_DISABLE": "0",
            "NCCL_IB_HCA": _exact_hcas(network, node),
            **gid,
            "NCCL_NET_GDR_LEVEL": "SYS",
            # Multus names the first secondary interface net1: bootstrap over the RDMA network.
            "NCCL_SOCKET_IFNAME": "net1",
        },
        resources=_rdma_resource(network, node),
        capabilities=("IPC_LOCK",),
        annotations={"k8s.v1.cni.cncf.io/networks": ",".join(network.secondary_networks)},
    )


def _efa(network: NetworkSpec, node: Node) -> NetworkPieces:
    return NetworkPieces(
        env={
            # The AWS OFI NCCL plugin in the trainer image; its libfabric drives the EFA devices.
            "NCCL_NET": "AWS Libfabric",
            "FI_PROVIDER": "efa",
            "FI_EFA_USE_DEVICE_RDMA": "1",
            "FI_EFA_FORK_SAFE": "1",
            "NCCL_SOCKET_IFNAME": _NOT_LOOPBACK,
            "NCCL_IB_DISABLE": "1",
        },
        resources=_rdma_resource(network, node),
        capabilities=("IPC_LOCK",),
    )


def _tcpxo(network: NetworkSpec, node: Node) -> NetworkPieces:
    nic_names = [f"eth{i + 1}" for i in range(len(network.secondary_networks))]
    interfaces = [{"interfaceName": "eth0", "network": "default"}] + [
        {"interfaceName": nic, "network": net}
        for nic, net in zip(nic_names, network.secondary_networks, strict=True)
    ]
    devices = [f"/dev/nvidia{i}" for i in range(node.gpus)] + [
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
        "/dev/dmabuf_import_helper",
    ]
    libraries_mount = {"name": "nvidia-libraries", "mountPath": _TCPXO_LIBRARIES}
    daemon = {
        "name": "tcpxo-daemon",
        "image": node.tcpxo_daemon_image,
        # A native sidecar: it starts before the trainer and does not keep the Job running.
        "restartPolicy": "Always",
        "command": ["/bin/sh", "-c"],
        "args": [
            "set -ex; chmod 755 /fts/entrypoint_rxdm_container.sh; "
            f"/fts/entrypoint_rxdm_container.sh --num_hops=2 --num_nics={len(nic_names)} "
            "--uid= --alsologtostderr"
        ],
        "securityContext": {"capabilities": {"add": ["NET_ADMIN", "NET_BIND_SERVICE"]}},
        "env": [{"name": "LD_LIBRARY_PATH", "value": f"{_TCPXO_LIBRARIES}/lib64"}],
        "volumeMounts": [
            libraries_mount,
            {"name": "sys", "mountPath": "/hostsysfs"},
            {"name": "proc-sys", "mountPath": "/hostprocsysfs"},
        ],
    }
    lib64 = f"{_TCPXO_LIBRARIES}/lib64"
    return NetworkPieces(
        env={
            # The FasTrak plugin and the NCCL it was built with come from the node's driver
            # directory: the launcher puts it before the image's LD_LIBRARY_PATH (as GKE's
            # manifests do), so the node's libnccl is loaded rather than the image's.
            ENV_LIBRARY_PATH: lib64,
            "NCCL_NET": "FasTrak",
            "NCCL_SOCKET_IFNAME": "eth0",
            "NCCL_FASTRAK_CTRL_DEV": "eth0",
            "NCCL_FASTRAK_IFNAME": ",".join(nic_names),
            "NCCL_FASTRAK_NUM_FLOWS": "2",
            "NCCL_FASTRAK_USE_SNAP": "1",
            "NCCL_FASTRAK_USE_LLCM": "1",
            "NCCL_FASTRAK_LLCM_DEVICE_DIRECTORY": _TCPXO_APERTURE,
            "NCCL_FASTRAK_ENABLE_CONTROL_CHANNEL": "0",
            "NCCL_FASTRAK_ENABLE_HOTPATH_LOGGING": "0",
            "NCCL_FASTRAK_PLUGIN_ACCEPT_TIMEOUT_MS": "600000",
            "NCCL_CROSS_NIC": "0",
            "NCCL_ALGO": "Ring,Tree",
            "NCCL_PROTO": "Simple,LL128",
            "NCCL_MIN_NCHANNELS": "4",
            "NCCL_NET_GDR_LEVEL": "PIX",
            "NCCL_NVLS_ENABLE": "0",
            "NCCL_BUFFSIZE": "8388608",
            "NCCL_DYNAMIC_CHUNK_SIZE": "524288",
            "NCCL_P2P_NET_CHUNKSIZE": "524288",
            "NCCL_P2P_PCI_CHUNKSIZE": "524288",
            "NCCL_P2P_NVL_CHUNKSIZE": "1048576",
            "NCCL_TUNER_PLUGIN": "libnccl-tuner.so",
            "NCCL_TUNER_CONFIG_PATH": f"{lib64}/a3plus_tuner_config.textproto",
            "NCCL_SHIMNET_GUEST_CONFIG_CHECKER_CONFIG_FILE": (
                f"{lib64}/a3plus_guest_config.textproto"
            ),
        },
        annotations={
            "devices.gke.io/container.tcpxo-daemon": "".join(f"- path: {d}\n" for d in devices),
            "networking.gke.io/default-interface": "eth0",
            "networking.gke.io/interfaces": json.dumps(interfaces),
        },
        sidecars=(daemon,),
        volumes=(
            {"name": "nvidia-libraries", "hostPath": {"path": "/home/kubernetes/bin/nvidia"}},
            {"name": "sys", "hostPath": {"path": "/sys"}},
            {"name": "proc-sys", "hostPath": {"path": "/proc/sys"}},
            {"name": "aperture-devices", "hostPath": {"path": _TCPXO_APERTURE}},
        ),
        trainer_mounts=(
            libraries_mount,
            {"name": "aperture-devices", "mountPath": _TCPXO_APERTURE},
        ),
    )


# Every network profile. A new fabric is one more builder and one more entry (and its name in
# NetworkSpec.profile).
PROFILES: dict[str, NetworkProfile] = {
    "tcp": NetworkProfile(_tcp, transport="Socket"),
    "infiniband": NetworkProfile(
        _infiniband,
        transport="IB",
        gpu_direct_rdma=True,
        rdma_resource="rdma/ib",
        needs_hcas=True,
    ),
    "roce": NetworkProfile(
        _roce, transport="IB", gpu_direct_rdma=True, rdma_resource="rdma/roce", needs_hcas=True
    ),
    "efa": NetworkProfile(
        _efa, transport="AWS Libfabric", gpu_direct_rdma=True, rdma_resource="vpc.amazonaws.com/efa"
    ),
    "tcpxo": NetworkProfile(
        _tcpxo,
        transport="FasTrak",
        host_access="its receive-datapath daemon runs with NET_ADMIN and the node's /sys and "
        "/proc/sys",
    ),
}
# Profiles a DPOJob may use in any namespace unless the admin says otherwise: those whose pods
# stay out of the node.
DEFAULT_ALLOWED_PROFILES = tuple(name for name, p in PROFILES.items() if p.host_access is None)
