"""Models that are never whole on any rank: built on the meta device, sharded per decoder layer,
then filled with only this rank's slice of each checkpoint tensor.

Under fsdp and hsdp every rank reads from the checkpoint's safetensors only the rows of each
tensor its shard holds (plain reads of those byte ranges), so a node reads one copy of the
weights whatever its process count, and no process ever holds a full copy of a model it shards.
The policy keeps fp32 master weights and computes in bf16 on GPUs; gradients are reduced in fp32.
The frozen reference is sharded the same way (per layer, in the compute dtype), so a reference
forward gathers one layer at a time, never the whole model as TRL's root-only wrap does.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from dpo_contract.config import DistributedConfig, TrainerConfig
from dpo_contract.fields import ModelRef
from dpo_contract.pod import BadInputError
from dpo_contract.reports import MixedPrecision
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from dpo_trainer.io.checkpoints import RowShard, shard_rows
from dpo_trainer.io.models import build_on_meta, model_location

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
# accelerate's names for the HSDP mesh (ParallelismConfig): `dpo` reports what it rendered.
HSDP_DIMS = ("dp_replicate", "dp_shard_cp")
ENV_OFFLOAD_PARAMS = "FSDP_OFFLOAD_PARAMS"


def shards_the_model(distributed: DistributedConfig) -> bool:
    return distributed.strategy in ("fsdp", "hsdp")


def device_mesh(distributed: DistributedConfig, device: str) -> DeviceMesh:
    """The ranks one copy of the model is sharded over: all of them (fsdp), or a shard group
    per replica (hsdp, replicas outermost)."""
    if distributed.strategy == "hsdp":
        shard = distributed.shard_group_size
        assert shard is not None, "hsdp renders a shard group size"
        return init_device_mesh(
            device, (distributed.world_size // shard, shard), mesh_dim_names=HSDP_DIMS
        )
    return init_device_mesh(device, (distributed.world_size,))


def row_shard(distributed: DistributedConfig, rank: int) -> RowShard | None:
    """Which rows of each sharded tensor `rank` holds under `device_mesh`'s layout (replicas
    outermost under hsdp); None when the model is not sharded."""
    if not shards_the_model(distributed):
        return None
    shards = distributed.shard_group_size if distributed.strategy == "hsdp" else None
    shards = shards or distributed.world_size
    return RowShard(index=rank % shards, shards=shards)


def offloads_parameters() -> bool:
    """`parallelism.cpuOffload`, as the rendered accelerate.yaml hands it to the launcher
    (fsdp_offload_params): the sharded states then live in host memory."""
    return os.environ.get(ENV_OFFLOAD_PARAMS, "false").lower() == "true"


def shard_home(device: torch.device) -> torch.device:
    """Where a rank's shards are allocated: its device, or the host when offloading."""
    return torch.device("cpu") if offloads_parameters() else device


def mixed_precision(compute_dtype: torch.dtype) -> MixedPrecision:
    """fp32 master weights and fp32 gradient reduction; parameters gathered for compute in the
    training dtype (bf16 on GPUs)."""
    return MixedPrecision(
        master_dtype="float32",
        param_dtype=_dtype_name(compute_dtype),
        reduce_dtype="float32",
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shard(model: nn.Module, mesh: DeviceMesh, *, compute_dtype: torch.dtype | None) -> None:
    """FSDP2 over `mesh`: each decoder layer its own unit (gathered one at a time), the rest
    (embeddings, final norm, LM head) in the root. `compute_dtype` casts parameters for compute
    and keeps the reduction in fp32 (None: compute in the stored dtype)."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    offload = (
        CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        if offloads_parameters()
        else OffloadPolicy()
    )
    policy = (
        MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        if compute_dtype is not None
        else MixedPrecisionPolicy()
    )
    layer_classes = set(_decoder_layer_classes(model))
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise BadInputError(
            f"{type(model).__name__} names no decoder layer class (_no_split_modules): it cannot "
            "be sharded per layer; use parallelism.strategy ddp"
        )
    for layer in layers:
        fully_shard(
            layer, mesh=mesh, mp_policy=policy, offload_policy=offload, reshard_after_forward=True
        )
    fully_shard(
        model, mesh=mesh, mp_policy=policy, offload_policy=offload, reshard_after_forward=True
    )


def _decoder_layer_classes(model: nn.Module) -> list[str]:
    unwrap: Any = getattr(model, "get_base_model", None)
    base = unwrap() if unwrap is not None else model
    return list(getattr(base, "_no_split_modules", None) or [])


def fill_from_checkpoint(
    model: nn.Module,
    ref: ModelRef,
    device: torch.device,
    *,
    initial: dict[str, torch.Tensor] | None = None,
) -> int:
    """Allocate this rank's shards on `device` and read into them only their rows of each
    checkpoint tensor; returns the bytes read. `initial` holds full tensors for parameters the
    checkpoint does not have (a new LoRA adapter's starting weights)."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=device)
    for name, buffer in model.named_buffers():
        if name in buffers:
            buffer.copy_(buffers[name])
    initial = initial or {}
    read, missing = 0, []
    with Checkpoint(Path(model_location(ref))) as checkpoint, torch.no_grad():
        for name, parameter in model.named_parameters():
            rows = local_rows(parameter)
            if name in initial:
                full = initial[name]
                part = full[rows.start : rows.stop] if rows is not None else full
            else:
                key = checkpoint_key(name)
                if key not in checkpoint:
                    missing.append(key)
                    continue
                part = checkpoint.read(key, rows)
                read += part.numel() * part.element_size()
            _local(parameter).copy_(part)
    if missing:
        raise BadInputError(
            f"model {ref.name!r}: {len(missing)} tensors of the model are not in its "
            f"checkpoint under their own names (e.g. {', '.join(missing[:3])}); the "
            "sharded loader reads tensors by name and does not convert checkpoint layouts "
            "(fused MoE experts, renamed keys): save the model with transformers 5 "
            "(save_pretrained) or use parallelism.strategy ddp"
        )
    return read


def _local(parameter: torch.Tensor) -> torch.Tensor:
    return parameter.to_local() if isinstance(parameter, DTensor) else parameter


def local_rows(parameter: torch.Tensor) -> slice | None:
    """The rows (first dimension) of the full tensor this rank's shard holds; None for a tensor
    that is not sharded. FSDP2 shards rows over one mesh dimension, chunked as torch.chunk."""
    if not isinstance(parameter, DTensor):
        return None
    sharded = [(dim, p) for dim, p in enumerate(parameter.placements) if isinstance(p, Shard)]
    if not sharded:
        return None
    (dim, placement), *others = sharded
    if placement.dim != 0 or others:
        raise RuntimeError(f"FSDP2 sharded a parameter as {parameter.placements}, not by rows")
    start, stop = shard_rows(
        parameter.shape[0],
        parameter.device_mesh.get_local_rank(dim),
        parameter.device_mesh.size(dim),
    )
    return slice(start, stop)


def checkpoint_key(parameter_name: str) -> str:
    """The checkpoint's name for a parameter of the (possibly PEFT-wrapped) model."""
    return parameter_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


# safetensors' dtype names (its format's header), as torch dtypes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class _Entry:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of the tensor's first byte in its file


class Checkpoint:
    """The safetensors files of a checkpoint, read by row range with plain reads: a rank reads
    the bytes of its rows and nothing else (no memory map whose pages would stay resident)."""

    def __init__(self, directory: Path) -> None:
        index = directory / SAFETENSORS_INDEX
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (directory / SAFETENSORS_SINGLE).exists():
            files = [SAFETENSORS_SINGLE]
        else:
            raise BadInputError(
                f"{directory}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}; fsdp and hsdp load "
                "each rank's shard from safetensors files: save the checkpoint with "
                "save_pretrained(safe_serialization=True)"
            )
        self.directory = directory
        self.entries: dict[str, _Entry] = {}
        for name in files:
            self.entries.update(_header(directory / name, name))
        self._stack = ExitStack()
        self._open: dict[str, io.BufferedReader] = {}

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def read(self, key: str, rows: slice | None) -> torch.Tensor:
        """The tensor `key`, or only its rows `rows`."""
        entry = self.entries[key]
        shape = list(entry.shape)
        offset, count = 0, math.prod(shape)
        if rows is not None:
            per_row = math.prod(shape[1:])
            shape[0] = rows.stop - rows.start
            offset, count = rows.start * per_row, shape[0] * per_row
        if count == 0:
            return torch.empty(shape, dtype=entry.dtype)
        # Read straight into a tensor torch owns: no intermediate copy, no borrowed buffer.
        tensor = torch.empty(count, dtype=entry.dtype)
        stream = self._stream(entry.file)
        stream.seek(entry.start + offset * entry.dtype.itemsize)
        target = tensor.view(torch.uint8).numpy().data
        if stream.readinto(target) != target.nbytes:
            raise BadInputError(
                f"{self.directory / entry.file}: {key} is cut short; download the model again"
            )
        return tensor.reshape(shape)

    def _stream(self, name: str) -> io.BufferedReader:
        if name not in self._open:
            self._open[name] = self._stack.enter_context((self.directory / name).open("rb"))
        return self._open[name]


def _header(path: Path, name: str) -> dict[str, _Entry]:
    """The tensors of one safetensors file: an 8-byte little-endian header length, a JSON header
    of dtype, shape and byte offsets (relative to the data after the header)."""
    with path.open("rb") as stream:
        length = int.from_bytes(stream.read(8), "little")
        header = json.loads(stream.read(length))
    data = 8 + length
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise BadInputError(
                f"{path}: {key} has dtype {info['dtype']}, which the sharded loader cannot read"
            )
        entries[key] = _Entry(
            name,
            SAFETENSORS_DTYPES[info["dtype"]],
            tuple(info["shape"]),
            data + info["data_offsets"][0],
        )
    return entries


def adapter_initial_weights(model: Any, seed: int) -> dict[str, torch.Tensor]:
    """A new LoRA adapter's starting weights, drawn as PEFT draws them, from `seed`, in place
    (on the CPU where the base is on the meta device); returned full. The same on every rank and
    for every world size: a sharded run starts where one process starts."""
    from peft.tuners.lora import LoraLayer

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            base: Any = module.get_base_layer().weight
            device = torch.device("cpu") if base.is_meta else base.device
            for adapter in module.active_adapters:
                for holder in (module.lora_A, module.lora_B):
                    holder[adapter].to_empty(device=device)
                init = model.peft_config[adapter].init_lora_weights
                module.reset_lora_parameters(adapter, init)  # type: ignore[no-untyped-call]
    finally:
        torch.random.set_rng_state(generator_state)
    return {
        name: parameter.detach().cpu().clone()
        for name, parameter in model.named_parameters()
        if ".lora_" in name
    }


@contextmanager
def replica_sync_on_last_micro_batch(model: Any, hsdp: bool) -> Iterator[None]:
    """What the Trainer's `no_sync` does for the micro-batches before the last: fsdp still
    reduce-scatters each one (its gradients stay sharded, never whole); hsdp reduce-scatters
    within the shard group and leaves only the all-reduce across replicas to the last one."""
    if not hsdp:
        yield
        return
    model.set_requires_all_reduce(False)
    try:
        yield
    finally:
        model.set_requires_all_reduce(True)


@dataclass
class Models:
    """The policy and the frozen reference a run trains with. Under fsdp/hsdp (`mesh` set) the
    policy is still on the meta device: `materialize_policy` shards and fills it once the
    trainer has wrapped it (LoRA goes in first)."""

    policy: Any
    reference: Any
    mesh: DeviceMesh | None = None
    read_bytes: int = 0


def load_sharded(config: TrainerConfig, device: torch.device, compute_dtype: torch.dtype) -> Models:
    """The policy on the meta device (fp32 master weights for a full fine-tune; a LoRA base is
    frozen and stays in `compute_dtype`) and, for a run with a reference model, that reference
    sharded and filled (frozen, in `compute_dtype`)."""
    mesh = device_mesh(config.distributed, device.type)
    trust = config.trust_remote_code
    master = compute_dtype if config.lora is not None else torch.float32
    policy = build_on_meta(config.model, trust_remote_code=trust, dtype=master)
    models = Models(policy=policy, reference=None, mesh=mesh)
    reference_ref = reference_model_ref(config)
    if reference_ref is not None:
        reference = build_on_meta(reference_ref, trust_remote_code=trust, dtype=compute_dtype)
        reference.requires_grad_(False)
        shard(reference, mesh, compute_dtype=None)
        models.read_bytes += fill_from_checkpoint(reference, reference_ref, shard_home(device))
        models.reference = reference
    return models


def reference_model_ref(config: TrainerConfig) -> ModelRef | None:
    """The model the reference is loaded from: the separate one, or the policy's own checkpoint
    for a full fine-tune; None where there is no reference model (LoRA disables its adapter;
    SimPO has none)."""
    if config.training.reference_free:
        return None
    if config.reference is not None:
        return config.reference
    return None if config.lora is not None else config.model


def materialize_policy(
    policy: Any,
    models: Models,
    config: TrainerConfig,
    device: torch.device,
    compute_dtype: torch.dtype,
) -> None:
    """Shard the (possibly LoRA-wrapped) policy over the mesh and fill this rank's shards: base
    weights from the checkpoint, a new adapter from `config.training.seed`."""
    assert models.mesh is not None
    initial = (
        adapter_initial_weights(policy, config.training.seed) if config.lora is not None else {}
    )
    shard(
        policy,
        models.mesh,
        compute_dtype=None if compute_dtype == torch.float32 else compute_dtype,
    )
    models.read_bytes += fill_from_checkpoint(
        policy, config.model, shard_home(device), initial=initial
    )


def export_full_model(model: Any, directory: Path, dtype: torch.dtype) -> Path:
    """Write a sharded full fine-tune as safetensors files, one per rank with whole tensors of
    about 1/N of the model each, in `dtype`, and (rank 0) the index `from_pretrained` reads;
    returns this rank's file.

    Tensors are gathered one at a time, and only their owner keeps theirs: no process holds
    more than its part plus the tensor in flight (never the model in fp32, as a full state dict
    gathered on rank 0 does). Every rank must call this: each gather is a collective.
    """
    from safetensors.torch import save_file

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    tensors = _unique_state(model)
    owners = export_owners({key: t.numel() for key, t in tensors.items()}, world)
    files = {r: f"model-{r + 1:05d}-of-{world:05d}.safetensors" for r in range(world)}
    mine: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        cast = tensor.detach().to(dtype)
        full = cast.full_tensor() if isinstance(cast, DTensor) else cast
        if owners[key] == rank:
            mine[key] = full.cpu().contiguous()
        del full, cast
    directory.mkdir(parents=True, exist_ok=True)
    save_file(mine, str(directory / files[rank]), metadata={"format": "pt"})
    if rank == 0:
        element = torch.empty((), dtype=dtype).element_size()
        index = {
            "metadata": {"total_size": sum(t.numel() for t in tensors.values()) * element},
            "weight_map": {key: files[owners[key]] for key in sorted(tensors)},
        }
        (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        model.config.save_pretrained(directory)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(directory)
    return directory / files[rank]


def _unique_state(model: Any) -> dict[str, torch.Tensor]:
    """The model's state dict (sharded tensors as they are), each tied tensor once, under the
    name transformers saves it by."""
    seen: set[int] = set()
    unique = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        unique[key] = tensor
    return unique


def export_owners(sizes: dict[str, int], world: int) -> dict[str, int]:
    """Each tensor's writing rank: largest first to the rank with the fewest elements so far,
    so every rank writes about 1/N of the model. The same on every rank."""
    load = [0] * world
    owners = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[key] = rank
        load[rank] += sizes[key]
    return owners


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """A sharded LoRA policy's adapter tensors, gathered whole (they are small); the frozen base
    is never gathered."""
    return {
        key: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()
        for key, t in model.state_dict().items()
        if ".lora_" in key
    }
