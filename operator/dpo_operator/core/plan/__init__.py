"""The memory plan (`dpo plan`): pure, from the spec alone. See `memory` for how each part is
counted.
"""

from dpo_operator.core.plan.memory import (
    EVAL_BATCH,
    PARTS,
    Estimate,
    Layout,
    Part,
    Plan,
    activation_bytes,
    estimate,
    layouts,
    lora_parameters,
    plan,
    reference_parameters,
)
from dpo_operator.core.plan.report import (
    format_plan,
    plan_status,
)
from dpo_operator.core.plan.shapes import (
    ASSUMED_GPU_MEMORY,
    GIB,
    GPU_LABELS,
    INSTANCE_GPU_MEMORY,
    KNOWN_MODELS,
    RUNTIME_BYTES,
    USABLE_FRACTION,
    GpuMemory,
    ModelShape,
    gpu_memory,
    model_shape,
)
from dpo_operator.core.plan.transfer import (
    disk_quantity,
    gate_disk_bytes,
    grace_period_seconds,
    save_seconds,
    training_disk,
    transfer_timeout_seconds,
)

__all__ = [
    "ASSUMED_GPU_MEMORY",
    "EVAL_BATCH",
    "GIB",
    "GPU_LABELS",
    "INSTANCE_GPU_MEMORY",
    "KNOWN_MODELS",
    "PARTS",
    "RUNTIME_BYTES",
    "USABLE_FRACTION",
    "Estimate",
    "GpuMemory",
    "Layout",
    "ModelShape",
    "Part",
    "Plan",
    "activation_bytes",
    "disk_quantity",
    "estimate",
    "format_plan",
    "gate_disk_bytes",
    "gpu_memory",
    "grace_period_seconds",
    "layouts",
    "lora_parameters",
    "model_shape",
    "plan",
    "plan_status",
    "reference_parameters",
    "save_seconds",
    "training_disk",
    "transfer_timeout_seconds",
]
