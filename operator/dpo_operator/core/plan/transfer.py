"""What a run moves and stages on each pod's disk: the model's download, its share of each
checkpoint (staged on local disk while it is sent to an object store), the pod's part of the
export; and so how long the long transfers may take and how much disk a pod needs. Pure, from
the spec and the model's shape."""

from __future__ import annotations

import math

from dpo_contract.presets import BUILTIN_PREFIX

from dpo_operator.api import DPOJobSpec
from dpo_operator.core.plan.memory import lora_parameters
from dpo_operator.core.plan.shapes import GIB, ModelShape
from dpo_operator.core.storage import pvc_claim

# Thirty minutes, plus the bytes a pod moves at a pessimistic 100 MiB/s.
TRANSFER_BASE_SECONDS = 1800
TRANSFER_BYTES_PER_SECOND = 100 * 2**20
# Logs, tokenizer, datasets and Python's own caches.
DISK_SLACK = 2 * GIB
# Without a size: room for the download of a model of a few billion parameters.
DISK_WITHOUT_SIZE = 50 * GIB
# Writing a checkpoint to local disk or a volume, pessimistically.
WRITE_BYTES_PER_SECOND = 200 * 2**20
# After SIGTERM a pod first finishes its step: room for it, and for the processes to stop.
STOP_MARGIN_SECONDS = 60
# Without a size: the grace period training pods had before the plan gave one.
GRACE_WITHOUT_SIZE = 300
# A checkpoint holds fp32 weights and AdamW's two fp32 moments of what is trained.
CHECKPOINT_BYTES_PER_TRAINED = 12


def disk_quantity(size: int) -> str:
    """A size as the quantity a pod asks for, in whole GiB rounded up."""
    return f"{-(-size // GIB)}Gi"


def downloaded_bytes(spec: DPOJobSpec, shape: ModelShape) -> int:
    """The model (and a separate reference) as each pod downloads it: bf16 safetensors, unless
    it is on a mounted volume or builtin."""
    models = [spec.model.name, *([spec.model.reference.name] if spec.model.reference else [])]
    remote = [m for m in models if pvc_claim(m) is None and not m.startswith(BUILTIN_PREFIX)]
    return 2 * shape.parameters * len(remote)


def checkpoint_share_bytes(spec: DPOJobSpec, shape: ModelShape, strategy: str) -> int:
    """The largest part of one checkpoint a pod writes: a sharded run's is 1/nodes of it, a
    replicated run's first pod writes it all."""
    trained = lora_parameters(spec, shape) if spec.peft.enabled else shape.parameters
    whole = CHECKPOINT_BYTES_PER_TRAINED * trained
    return whole // spec.resources.nodes if strategy in ("fsdp", "hsdp") else whole


def disk_bytes(spec: DPOJobSpec, shape: ModelShape | None, strategy: str) -> int:
    """A pod's local disk: the download, and with an object store two checkpoint shares (one
    written while the one before is still being sent) and its part of the export."""
    if shape is None:
        return DISK_WITHOUT_SIZE
    staged = 0
    if _staged_for_an_object_store(spec):
        staged = 2 * checkpoint_share_bytes(spec, shape, strategy)
        if not spec.peft.enabled:
            staged += 2 * shape.parameters // spec.resources.nodes
    return downloaded_bytes(spec, shape) + staged + DISK_SLACK


def training_disk(spec: DPOJobSpec, shape: ModelShape | None, strategy: str) -> str:
    """`resources.ephemeralStorage`, or the plan's disk for each training pod."""
    asked = spec.resources.ephemeral_storage
    return str(asked) if asked is not None else disk_quantity(disk_bytes(spec, shape, strategy))


def gate_disk_bytes(spec: DPOJobSpec, shape: ModelShape | None) -> int:
    """The eval and promotion pods' local disk: the model's download and the adapter."""
    if shape is None:
        return DISK_WITHOUT_SIZE
    adapter = 4 * lora_parameters(spec, shape) if spec.peft.enabled else 2 * shape.parameters
    return downloaded_bytes(spec, shape) + adapter + DISK_SLACK


def save_seconds(spec: DPOJobSpec, shape: ModelShape | None, strategy: str) -> int:
    """How long a pod takes to save a checkpoint after SIGTERM: finish its step, write its share,
    and with an object store send it (its disk goes with the pod)."""
    if shape is None:
        return GRACE_WITHOUT_SIZE
    share = checkpoint_share_bytes(spec, shape, strategy)
    seconds = share / WRITE_BYTES_PER_SECOND
    if _staged_for_an_object_store(spec):
        seconds += share / TRANSFER_BYTES_PER_SECOND
    return STOP_MARGIN_SECONDS + math.ceil(seconds)


def grace_period_seconds(spec: DPOJobSpec, shape: ModelShape | None, strategy: str) -> int:
    """`runPolicy.terminationGracePeriodSeconds`, or the time a save on SIGTERM takes."""
    asked = spec.run_policy.termination_grace_period_seconds
    return asked if asked is not None else save_seconds(spec, shape, strategy)


def _staged_for_an_object_store(spec: DPOJobSpec) -> bool:
    return pvc_claim(spec.output.uri) is None


def transfer_timeout_seconds(spec: DPOJobSpec, shape: ModelShape | None, strategy: str) -> int:
    """`network.transferTimeoutSeconds`, or the plan's: a pod downloads the model and sends its
    share of a checkpoint."""
    if spec.network.transfer_timeout_seconds is not None:
        return spec.network.transfer_timeout_seconds
    if shape is None:
        return TRANSFER_BASE_SECONDS
    moved = downloaded_bytes(spec, shape) + checkpoint_share_bytes(spec, shape, strategy)
    return TRANSFER_BASE_SECONDS + math.ceil(moved / TRANSFER_BYTES_PER_SECOND)
