"""The pod's PID 1 prepares what the fabric needs: library path and locked-memory limit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dpo_trainer.launch import child_environment

LIMITED = """
import resource
from dpo_trainer.launch import raise_locked_memory_limit
resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 * 1024, 8 * 1024 * 1024))
print(raise_locked_memory_limit("{net}"))
print(resource.getrlimit(resource.RLIMIT_MEMLOCK)[0])
"""


def test_the_node_plugin_directory_comes_first_never_replacing_the_image_path() -> None:
    """GKE's TCPXO manifests put the node's NCCL directory first: the FasTrak plugin must run
    with the node's libnccl, not the image's pip one."""
    env = child_environment(
        {
            "LD_LIBRARY_PATH": "/usr/local/nvidia/lib64:/opt/amazon/efa/lib",
            "DPO_LIBRARY_PATH": "/x",
        },
        Path("/tmp/launch"),
    )
    assert env["LD_LIBRARY_PATH"] == "/x:/usr/local/nvidia/lib64:/opt/amazon/efa/lib"
    assert child_environment({}, Path("/t")).get("LD_LIBRARY_PATH") is None


def test_the_trainers_return_freed_host_buffers_unless_the_pod_says_otherwise() -> None:
    """glibc's mmap threshold is fixed, so buffers freed at every layer go back to the kernel
    instead of growing each rank's resident memory (the memory tier measures the difference)."""
    assert child_environment({}, Path("/t"))["MALLOC_MMAP_THRESHOLD_"] == str(128 * 1024)
    chosen = child_environment({"MALLOC_MMAP_THRESHOLD_": "4096"}, Path("/t"))
    assert chosen["MALLOC_MMAP_THRESHOLD_"] == "4096"


def limited_run(net: str) -> list[str]:
    script = LIMITED.format(net=net)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    return result.stdout.splitlines()


def test_rdma_raises_locked_memory_to_the_hard_limit_and_says_when_that_is_not_enough() -> None:
    warning, soft = limited_run("IB")
    assert int(soft) == 8 * 1024 * 1024, "soft limit raised to the hard one"
    assert "locked memory is limited to 8388608 bytes" in warning
    assert "LimitMEMLOCK=infinity" in warning


def test_tcp_needs_no_locked_memory() -> None:
    warning, soft = limited_run("Socket")
    assert warning == "None"
    assert int(soft) == 64 * 1024
