"""How long a run's long transfers may take: the model's download and load at startup, a pod's
share of each checkpoint, the export at the end. Pure, from the spec and the model's shape."""

from __future__ import annotations

import math

from dpo_operator.api import DPOJobSpec
from dpo_operator.core.plan.memory import lora_parameters
from dpo_operator.core.plan.shapes import ModelShape

# Thirty minutes, plus the bytes a pod moves at a pessimistic 100 MiB/s.
TRANSFER_BASE_SECONDS = 1800
TRANSFER_BYTES_PER_SECOND = 100 * 2**20


def transfer_timeout_seconds(spec: DPOJobSpec, shape: ModelShape | None) -> int:
    """`network.transferTimeoutSeconds`, or the plan's: a pod downloads the bf16 model and
    sends its share of a checkpoint (fp32 weights, gradients and optimizer moments: 16 bytes per
    trained parameter)."""
    if spec.network.transfer_timeout_seconds is not None:
        return spec.network.transfer_timeout_seconds
    if shape is None:
        return TRANSFER_BASE_SECONDS
    trained = lora_parameters(spec, shape) if spec.peft.enabled else shape.parameters
    moved = 2 * shape.parameters + 16 * trained // spec.resources.nodes
    return TRANSFER_BASE_SECONDS + math.ceil(moved / TRANSFER_BYTES_PER_SECOND)
