"""The trainer image matches its wheels and carries what each network profile's NCCL_NET loads."""

from __future__ import annotations

import re
import tomllib

import pytest
from dpo_contract.pod import ENV_LIBRARY_PATH
from dpo_operator.api import NetworkSpec
from dpo_operator.core.network import network_pieces

from tests.conftest import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
CONSTRAINTS = (REPO / "constraints.txt").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROFILES = {
    "tcp": {},
    "infiniband": {"rdmaDevices": 8, "hcas": ["mlx5_0"]},
    "roce": {"secondaryNetworks": ["roce-a"], "rdmaDevices": 1, "hcas": ["mlx5_0"]},
    "efa": {"rdmaDevices": 32},
    "tcpxo": {"secondaryNetworks": [f"vpc{i}" for i in range(1, 9)]},
}


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def trainer_stage() -> str:
    return DOCKERFILE[DOCKERFILE.index("AS trainer") :]


def test_the_base_image_cuda_is_not_older_than_the_torch_wheels() -> None:
    cuda = re.search(r"^ARG CUDA_VERSION=(\d+\.\d+)", DOCKERFILE, re.MULTILINE)
    base = re.search(r"^ARG TRAINER_BASE_IMAGE=nvidia/cuda:(\S+)", DOCKERFILE, re.MULTILINE)
    wheel = re.search(r"^nvidia-cuda-runtime(?:-cu\d+)?==(\d+\.\d+)", CONSTRAINTS, re.MULTILINE)
    assert cuda is not None
    assert base is not None
    assert wheel is not None
    assert base.group(1).startswith("${CUDA_VERSION}-"), "the base image follows CUDA_VERSION"
    print(f"base image CUDA {cuda.group(1)}, torch wheels' CUDA runtime {wheel.group(1)}")
    assert version(cuda.group(1)) >= version(wheel.group(1)), (
        f"the trainer image's CUDA {cuda.group(1)} is older than the wheels' {wheel.group(1)}: "
        "raise CUDA_VERSION in the Dockerfile"
    )


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_pins_its_transport_and_the_image_carries_it(profile: str) -> None:
    env = network_pieces(NetworkSpec.model_validate({"profile": profile, **PROFILES[profile]}), 8)
    transport = env.env["NCCL_NET"]
    image = trainer_stage()
    carried = {
        "Socket": [],
        "IB": ["rdma-core", "ibverbs-providers", "libibverbs1"],
        "AWS Libfabric": ["/opt/amazon/efa", "/opt/aws-ofi-nccl"],
        # GKE mounts the plugin from the node; the launcher puts the directory first.
        "FasTrak": [],
    }[transport]
    assert all(piece in image for piece in carried), (profile, transport)
    assert "LD_LIBRARY_PATH" not in env.env, "a pod env value would replace the image's path"
    if transport == "FasTrak":
        assert env.env[ENV_LIBRARY_PATH] == "/usr/local/nvidia/lib64"


def test_the_image_appends_its_fabric_libraries_to_ld_library_path() -> None:
    path = re.search(r"LD_LIBRARY_PATH=(\S+)", trainer_stage())
    assert path is not None
    parts = path.group(1).split(":")
    assert parts[0] == "${LD_LIBRARY_PATH}", "appended to the base image's own path"
    assert {"/opt/amazon/efa/lib", "/opt/aws-ofi-nccl/lib"} <= set(parts)


def test_the_trainer_image_reads_every_object_store_an_example_names() -> None:
    """The trainer image installs the `trainer` extra: each scheme the examples use (s3:// on
    EKS, gs:// on GKE) needs its fsspec driver there, or the run fails at its first read."""
    schemes = set(
        re.findall(
            r"\b(s3|gs)://", "".join(p.read_text() for p in (REPO / "examples").glob("*.yaml"))
        )
    )
    trainer_extra = PYPROJECT["project"]["optional-dependencies"]["trainer"]
    drivers = {"s3": "s3fs", "gs": "gcsfs"}
    assert schemes == {"s3", "gs"}
    for scheme in schemes:
        assert any(d.startswith(drivers[scheme]) for d in trainer_extra), scheme
        assert re.search(rf"^{drivers[scheme]}==", CONSTRAINTS, re.MULTILINE), "pinned"
    assert '"$(ls /wheels/dpo_operator-*.whl)[trainer]"' in trainer_stage()
