"""What a run costs in compute: the FLOPs of a DPO step, and the time and GPU-hours they take on
the GPU the spec names, at a stated utilisation.

Per token of a chosen or rejected sequence, with N the parameters a token goes through (the
routed experts only, for a mixture): the policy's forward and backward, 6N for a full fine-tune
(weights and activations get gradients) and 4N with LoRA (activations only; the adapter is too
small to count), plus 2N more when activation checkpointing recomputes the forward; the frozen
reference's forward, 2N, unless the loss is reference-free. Attention's own FLOPs (quadratic
in the length) are left out: at DPO's lengths they are a few percent of the weights'.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpo_operator.api import DPOJobSpec
from dpo_operator.core.plan.shapes import GPU_LABELS, ModelShape

# Dense bf16 tensor-core peak of one GPU (the vendor's figure without sparsity), by the product
# a node label names. Instance types name no product: theirs are listed.
PEAK_BF16_FLOPS = {
    "b200": 2250e12,
    "h200": 989e12,
    "h100": 989e12,
    "a100": 312e12,
    "l40s": 362e12,
    "l4": 121e12,
    "a10g": 70e12,
}
INSTANCE_GPUS = {
    "p5.48xlarge": "h100",
    "p5e.48xlarge": "h200",
    "p5en.48xlarge": "h200",
    "p4d.24xlarge": "a100",
    "p4de.24xlarge": "a100",
    "a3-highgpu-8g": "h100",
    "a3-megagpu-8g": "h100",
    "a2-highgpu-8g": "a100",
    "a2-ultragpu-8g": "a100",
    "standard_nd96isr_h100_v5": "h100",
    "standard_nd96isr_h200_v5": "h200",
    "standard_nd96amsr_a100_v4": "a100",
}
# Model FLOPs utilisation the estimate assumes: what well-tuned FSDP training of a dense model
# reaches on current GPUs; a stated assumption, not a measurement.
UTILISATION = 0.4


@dataclass(frozen=True)
class ComputeEstimate:
    flops_per_token: float
    tokens_per_step: int  # upper bound: every sequence at dpo.maxLength
    steps: int | None  # dpo.maxSteps; otherwise known only once the data is read
    gpu: str | None
    peak_flops: float | None
    gpus: int
    utilisation: float = UTILISATION

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_token * self.tokens_per_step

    @property
    def seconds_per_step(self) -> float | None:
        if self.peak_flops is None:
            return None
        return self.flops_per_step / (self.peak_flops * self.utilisation * self.gpus)

    @property
    def gpu_hours(self) -> float | None:
        per_step = self.seconds_per_step
        if per_step is None or self.steps is None:
            return None
        return per_step * self.steps * self.gpus / 3600


def flops_per_token(spec: DPOJobSpec, shape: ModelShape) -> float:
    """FLOPs of one token of a chosen or rejected sequence (see the module's docstring)."""
    n = shape.active_parameters or shape.parameters
    policy = (4 if spec.peft.enabled else 6) * n
    if spec.parallelism.activation_checkpointing:
        policy += 2 * n
    reference = 0 if spec.dpo.loss_type == ["simpo"] else 2 * n
    return float(policy + reference)


def pairs_per_step(spec: DPOJobSpec) -> int:
    dpo = spec.dpo
    if dpo.global_batch_size is not None:
        return dpo.global_batch_size
    world = spec.resources.nodes * max(spec.resources.gpus_per_node, 1)
    return dpo.per_device_batch_size * dpo.gradient_accumulation_steps * world


def estimate_compute(spec: DPOJobSpec, shape: ModelShape) -> ComputeEstimate:
    gpu = gpu_product(spec)
    return ComputeEstimate(
        flops_per_token=flops_per_token(spec, shape),
        tokens_per_step=pairs_per_step(spec) * 2 * spec.dpo.max_length,
        steps=spec.dpo.max_steps,
        gpu=gpu,
        peak_flops=PEAK_BF16_FLOPS.get(gpu) if gpu else None,
        gpus=spec.resources.nodes * spec.resources.gpus_per_node,
    )


def gpu_product(spec: DPOJobSpec) -> str | None:
    """The GPU a node-selector label names (h100, a100, ...), or None."""
    if spec.resources.gpus_per_node == 0:
        return None
    for label in GPU_LABELS:
        value = spec.scheduling.node_selector.get(label, "").lower()
        if value in INSTANCE_GPUS:
            return INSTANCE_GPUS[value]
        # Longest first: "h100" before "a10" would be wrong the other way round.
        for product in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
            if product in value:
                return product
    return None


def describe_compute(estimate: ComputeEstimate) -> list[str]:
    """`dpo plan`'s lines on compute."""
    lines = [
        f"compute    {_flops(estimate.flops_per_step)} per step at most "
        f"({estimate.tokens_per_step:,} tokens: each pair's chosen and rejected at maxLength; "
        f"{_flops(estimate.flops_per_token)} per token)"
    ]
    per_step = estimate.seconds_per_step
    if estimate.gpus == 0:
        return lines
    if per_step is None or estimate.gpu is None or estimate.peak_flops is None:
        lines.append(
            "           time: name the GPU in scheduling.nodeSelector (nvidia.com/gpu.product) "
            "to estimate it"
        )
        return lines
    at = (
        f"{estimate.gpus} x {estimate.gpu.upper()} at {estimate.utilisation:.0%} of "
        f"{estimate.peak_flops / 1e12:,.0f} TFLOP/s bf16"
    )
    steps = estimate.steps or 1000
    hours = per_step * steps / 3600
    lines.append(
        f"           ~{per_step:,.2f} s per step on {at}; {steps} steps"
        + ("" if estimate.steps else " (the run's count follows from the data, read at start)")
        + f": ~{hours:,.1f} h, ~{hours * estimate.gpus:,.0f} GPU-hours"
    )
    return lines


def _flops(value: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if value >= size:
            return f"{value / size:,.1f} {unit}"
    return f"{value / 1e6:,.1f} MFLOP"
