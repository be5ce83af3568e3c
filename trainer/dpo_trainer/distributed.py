"""What a training process really runs on, checked against what the operator rendered.

Launchers and libraries can change a run quietly: accelerate turns an FSDP config into DDP on
CPU, a pod without a usable CUDA runtime trains on the CPU, a launch that lost its rendezvous
trains alone. The trainer reads back what it got (distributed type, FSDP version, the mesh the
parameters are sharded over, world size, device) and refuses to train when that is not
trainer.json's `distributed`. It also computes the one parameters digest every rank agrees on.
"""

from __future__ import annotations

import hashlib
import os
import resource
from datetime import timedelta
from typing import Any

import torch
from dpo_contract.config import DistributedConfig, DistributedRun
from dpo_contract.pod import WrongEnvironmentError

# accelerate's DistributedType for each rendered strategy, by device. One process may also sit
# in a process group of one (a CPU pod's env sets LOCAL_RANK): the world size tells them apart.
_EXPECTED_TYPES = {
    ("single", "cuda"): ("NO", "MULTI_GPU"),
    ("single", "cpu"): ("NO", "MULTI_CPU"),
    ("ddp", "cuda"): ("MULTI_GPU",),
    ("ddp", "cpu"): ("MULTI_CPU",),
    ("fsdp", "cuda"): ("FSDP",),
    ("fsdp", "cpu"): ("FSDP",),
    ("hsdp", "cuda"): ("FSDP",),
    ("hsdp", "cpu"): ("FSDP",),
}


def require_gpus(count: int, asked_by: str) -> None:
    """GPUs asked for must be GPUs torch can use, before anything is loaded: never a CPU run in
    their place. `asked_by` names the setting that asks for them."""
    if count == 0:
        return
    problem = _cuda_problem()
    if problem is not None:
        raise WrongEnvironmentError(
            f"{asked_by} asks for {count} GPU(s) per pod but {problem}; check that the pod got "
            "its GPUs (resources.gpusPerNode, resources.gpuResourceName), that the node's NVIDIA "
            f"driver is installed, and that it supports the CUDA {torch.version.cuda} runtime of "
            f"this image (torch {torch.__version__})"
        )
    visible = torch.cuda.device_count()
    if visible < count:
        raise WrongEnvironmentError(
            f"{asked_by} asks for {count} GPU(s) per pod but torch sees {visible}; check the "
            "pod's GPU limit (resources.gpusPerNode) and CUDA_VISIBLE_DEVICES"
        )


def _cuda_problem() -> str | None:
    """Why CUDA cannot be used here, in the driver's words where it gives them; None if it can."""
    if torch.version.cuda is None:
        return "this torch build has no CUDA support"
    try:
        torch.cuda.init()  # type: ignore[no-untyped-call]
    except (RuntimeError, AssertionError) as error:  # e.g. "The NVIDIA driver ... is too old"
        return f"CUDA cannot start: {error}"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def keep_fsdp_on_cpu() -> None:
    """Let accelerate run its FSDP plugin on CPUs, for the `cpu` device only.

    `AcceleratorState` switches to FSDP only when the process group is one of the GPU-like
    distributed types; on CPU (MULTI_CPU) it drops the plugin and runs DDP. FSDP2 itself shards
    over gloo on CPU, so after accelerate has set the state up we put back the plugin it was
    given. Everything after that (wrapping, mesh, sharded checkpoints, full state dicts) is the
    accelerate code GPU pods run. Never installed for the cuda device.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_dpo_keeps_fsdp_on_cpu", False):
        return

    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init._dpo_keeps_fsdp_on_cpu = True  # type: ignore[attr-defined]
    AcceleratorState.__init__ = init


def describe_run(accelerator: Any, model: Any) -> DistributedRun:
    """What this process runs: read from accelerate's state and from the parameters themselves
    (after the model was prepared, so FSDP has sharded it)."""
    from torch.distributed.tensor import DTensor

    parameters = list(model.parameters())
    sharded = next((p for p in parameters if isinstance(p, DTensor)), None)
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    mesh = sharded.device_mesh if sharded is not None else None
    return DistributedRun(
        distributed_type=str(accelerator.distributed_type.value),
        fsdp_version=plugin.fsdp_version if plugin is not None else None,
        mesh_shape=list(mesh.shape) if mesh is not None else None,
        mesh_dims=list(mesh.mesh_dim_names or ()) if mesh is not None else None,
        world_size=accelerator.num_processes,
        device=parameters[0].device.type if parameters else accelerator.device.type,
    )


def check_run(expected: DistributedConfig, ran: DistributedRun) -> None:
    """Raise WrongEnvironmentError naming every difference between trainer.json and what runs."""
    wanted_types = _EXPECTED_TYPES[(expected.strategy, expected.device)]
    differences = []
    if ran.distributed_type not in wanted_types:
        differences.append(
            f"distributed type {ran.distributed_type} (expected {' or '.join(wanted_types)})"
        )
    if ran.world_size != expected.world_size:
        differences.append(f"world size {ran.world_size} (expected {expected.world_size})")
    if ran.device != expected.device:
        differences.append(f"parameters on {ran.device} (expected {expected.device})")
    if expected.fsdp_version is not None and ran.fsdp_version != expected.fsdp_version:
        differences.append(f"FSDP version {ran.fsdp_version} (expected {expected.fsdp_version})")
    wanted_mesh = expected.mesh_shape
    if wanted_mesh is not None and tuple(ran.mesh_shape or ()) != wanted_mesh:
        differences.append(
            f"parameters sharded over a mesh of shape {ran.mesh_shape} (expected "
            f"{list(wanted_mesh)})"
        )
    if differences:
        raise _launched_otherwise(expected, differences)


def check_launch(expected: DistributedConfig, launched_type: str) -> None:
    """Before anything is loaded: fsdp and hsdp build the model on the meta device for FSDP to
    shard, so a launcher that dropped FSDP (`launched_type`, accelerate's type without it) must
    stop the run here, not when the Trainer tries to move an empty model."""
    if expected.strategy not in ("fsdp", "hsdp"):
        return
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return
    raise _launched_otherwise(expected, [f"distributed type {launched_type} (expected FSDP)"])


def _launched_otherwise(expected: DistributedConfig, differences: list[str]) -> Exception:
    return WrongEnvironmentError(
        f"trainer.json renders {expected.strategy} on {expected.nnodes} node(s) x "
        f"{expected.nproc_per_node} {expected.device} process(es), but this run got "
        + "; ".join(differences)
        + ". Launch with the rendered /etc/dpo/accelerate.yaml and the same trainer image "
        "as the operator (`dpo render` shows both)"
    )


def state_bytes(model: Any, optimizer: Any) -> dict[str, int]:
    """Bytes this rank holds of the model's parameters (its shards, when sharded), of the
    trainable ones (their gradients take as much), and of the optimizer's states."""
    from torch.distributed.tensor import DTensor

    def local_bytes(tensor: torch.Tensor) -> int:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        return local.numel() * local.element_size()

    parameters = list(model.parameters())
    states = [
        value
        for per_parameter in optimizer.state.values()
        for value in per_parameter.values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    ]
    return {
        "parameterBytes": sum(local_bytes(p) for p in parameters),
        "trainableBytes": sum(local_bytes(p) for p in parameters if p.requires_grad),
        "optimizerBytes": sum(local_bytes(s) for s in states),
    }


def peak_memory_bytes(device: str) -> int:
    """The most this process has held: allocated GPU memory, or its resident set on CPU."""
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def parameters_digest(model: Any, as_dtype: torch.dtype | None = None) -> str:
    """sha256 over the full trainable tensors (cast to `as_dtype`, the dtype they are saved in,
    when that is not their own), in name order: the same on every rank, and the same for the
    saved artifact loaded back.

    Sharded (DTensor) parameters are gathered first, which is a collective: every rank must call
    this at the same point.
    """
    from torch.distributed.tensor import DTensor

    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters(), key=lambda item: item[0]):
        if not parameter.requires_grad:
            continue
        cast = parameter.detach().to(as_dtype) if as_dtype is not None else parameter.detach()
        full = cast.full_tensor() if isinstance(cast, DTensor) else cast
        digest.update(name.encode())
        digest.update(full.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def set_collective_timeout(seconds: int) -> None:
    """The timeout of every collective from now on, in every process group of this process
    (the world's and those FSDP's meshes made): training steps get a short one, the phases
    around long transfers a long one."""
    if not torch.distributed.is_initialized():
        return
    from torch.distributed import distributed_c10d

    timeout = timedelta(seconds=seconds)
    # No public list of a process's groups: c10d's own registry holds each one it created.
    for group in list(distributed_c10d._world.pg_map):
        if not distributed_c10d._rank_not_in_group(group):
            torch.distributed.set_timeout(timeout, group)
