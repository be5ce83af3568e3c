"""`dpo-trainer launch -- CMD...`: PID 1 of a training pod, around `accelerate launch`.

It also prepares the environment the fabric needs: the node's NCCL plugin directory put before
the image's LD_LIBRARY_PATH, and the locked-memory limit RDMA registration needs raised as far as
the pod allows (it says so at start when that is not enough).

Three things go wrong without it:
- In a pod only PID 1 receives SIGTERM. `accelerate launch` forwards nothing with one process
  per pod, and torchrun SIGKILLs its workers after a short grace period, so the trainers would
  die mid-checkpoint. Here the trainers register themselves and are signalled directly.
- Both accelerate launchers turn any trainer failure into exit code 1, which would erase the pod
  contract's codes (2 = bad input, never retried). Each trainer records its own code, and this
  process exits with it.
- Orphaned grandchildren must be reaped by PID 1. This process waits for every descendant.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from dpo_contract.pod import (
    ENV_LIBRARY_PATH,
    EXIT_BAD_INPUT,
    EXIT_GATE_REJECTED,
    EXIT_OK,
    EXIT_WRONG_ENVIRONMENT,
)

# Set for the trainers: where each registers its pid and, on the way out, its exit code.
ENV_LAUNCH_DIR = "DPO_LAUNCH_DIR"
_PR_SET_CHILD_SUBREAPER = 36


def register_trainer(pid: int) -> None:
    """Called by a trainer process at start: the launcher signals it directly."""
    directory = os.environ.get(ENV_LAUNCH_DIR)
    if directory:
        (Path(directory) / f"{pid}.pid").write_text("")


def record_exit(pid: int, code: int) -> None:
    """Called by a trainer process on exit: the launcher exits with the most telling code."""
    directory = os.environ.get(ENV_LAUNCH_DIR)
    if directory:
        (Path(directory) / f"{pid}.exit").write_text(str(code))


# glibc returns a freed block of at least this many bytes to the kernel at once. Left to itself
# it raises the threshold after a large block is freed (up to 32 MiB), and the host buffers a
# sharded run frees at every layer (each rank's slice read at load, each layer gathered on CPU)
# stay on its heap: a rank's resident memory then creeps far past what its tensors need.
MALLOC_MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"
MMAP_THRESHOLD_BYTES = 1 << 17


def child_environment(parent: dict[str, str], launch_dir: Path) -> dict[str, str]:
    """The trainers' env: the parent's, with DPO_LIBRARY_PATH before LD_LIBRARY_PATH (the
    node's NCCL and its plugin win over the image's, as the plugin needs) and glibc's mmap
    threshold fixed (unless the pod sets it)."""
    env = {
        MALLOC_MMAP_THRESHOLD: str(MMAP_THRESHOLD_BYTES),
        **parent,
        ENV_LAUNCH_DIR: str(launch_dir),
    }
    extra = parent.get(ENV_LIBRARY_PATH)
    if extra:
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (extra, parent.get("LD_LIBRARY_PATH")) if p)
    return env


# NCCL transports that register memory with an RDMA NIC (pinned pages count as locked memory).
RDMA_TRANSPORTS = ("IB", "AWS Libfabric")


def raise_locked_memory_limit(nccl_net: str | None) -> str | None:
    """Raise the soft RLIMIT_MEMLOCK to the hard one for RDMA transports; the warning to log when
    it stays limited. A non-root process cannot go past the hard limit, and IPC_LOCK does not
    apply to it: the node's container runtime must set it (LimitMEMLOCK=infinity)."""
    if nccl_net not in RDMA_TRANSPORTS:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
            soft = hard
    if soft == resource.RLIM_INFINITY:
        return None
    return (
        f"NCCL_NET={nccl_net} registers memory with the RDMA NIC, but locked memory is limited "
        f"to {soft} bytes here and this non-root process cannot raise it: registration will "
        "fail or stall. Set LimitMEMLOCK=infinity for the nodes' container runtime (containerd's "
        "default; see the chart's README, 'RDMA nodes')"
    )


def run_forwarding_signals(command: list[str]) -> int:
    launch_dir = Path(tempfile.mkdtemp(prefix="dpo-launch-"))
    warning = raise_locked_memory_limit(os.environ.get("NCCL_NET"))
    if warning:
        print(f"dpo-trainer launch: WARNING: {warning}", file=sys.stderr, flush=True)
    _become_subreaper()
    child = subprocess.Popen(
        command, start_new_session=True, env=child_environment(dict(os.environ), launch_dir)
    )

    def forward(signum: int, frame: FrameType | None) -> None:
        del frame
        trainers = [int(p.stem) for p in launch_dir.glob("*.pid")]
        if not trainers:  # nothing to checkpoint yet: stop everything
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signum)
        for pid in trainers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    try:
        status = child.wait()
        _wait_for_descendants(child.pid)
        reported = [int(p.read_text()) for p in launch_dir.glob("*.exit")]
    finally:
        shutil.rmtree(launch_dir, ignore_errors=True)
    return outcome(status, reported)


def outcome(launcher_status: int, reported: list[int]) -> int:
    """The pod's exit code: the trainers' own verdict wins over the launcher's generic one."""
    for code in (EXIT_BAD_INPUT, EXIT_WRONG_ENVIRONMENT, EXIT_GATE_REJECTED):
        if code in reported:
            return code
    failures = [code for code in reported if code != EXIT_OK]
    if failures:
        return failures[0]
    if launcher_status < 0:  # killed by a signal: report it as a shell would
        return 128 - launcher_status
    return launcher_status


def _become_subreaper() -> None:
    """Adopt orphaned descendants (Linux), so they can be waited for and reaped."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _wait_for_descendants(group: int) -> None:
    """Reap adopted descendants; then wait until nothing of the process group is left."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
    while True:
        try:
            os.killpg(group, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: dpo-trainer launch -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    return run_forwarding_signals(argv)
