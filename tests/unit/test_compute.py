"""What a run costs (dpo_operator.core.plan.compute): FLOPs per token by what the step does, the
GPU a label names, and `dpo plan`'s time and GPU-hours at the stated utilisation."""

from __future__ import annotations

import pytest
from dpo_operator.core.plan import model_shape
from dpo_operator.core.plan.compute import (
    PEAK_BF16_FLOPS,
    UTILISATION,
    describe_compute,
    estimate_compute,
    flops_per_token,
    gpu_product,
)

from tests.conftest import example, job_with


def test_a_token_costs_what_the_step_does_with_it() -> None:
    """8.19B parameters: LoRA 4N (no weight gradients) + 2N recomputed + 2N reference; a full
    fine-tune 6N + 2N + 2N; precomputed or not, the reference's forward is paid once."""
    lora = example("qwen3-8b-lora").spec
    shape = model_shape(lora)
    assert shape is not None
    n = shape.parameters
    assert flops_per_token(lora, shape) == 8 * n
    full = lora.model_copy(update={"peft": lora.peft.model_copy(update={"enabled": False})})
    assert flops_per_token(full, shape) == 10 * n


def test_a_mixture_costs_only_the_experts_a_token_goes_through() -> None:
    spec = job_with(model={"name": "Qwen/Qwen3-30B-A3B"}, resources={"gpusPerNode": 8}).spec
    shape = model_shape(spec)
    assert shape is not None
    assert shape.active_parameters is not None
    assert flops_per_token(spec, shape) == 8 * shape.active_parameters
    assert shape.active_parameters < shape.parameters / 8


@pytest.mark.parametrize(
    ("label", "value", "product"),
    [
        ("nvidia.com/gpu.product", "NVIDIA-H100-80GB-HBM3", "h100"),
        ("nvidia.com/gpu.product", "NVIDIA-A100-SXM4-80GB", "a100"),
        ("nvidia.com/gpu.product", "NVIDIA-L40S", "l40s"),
        ("cloud.google.com/gke-accelerator", "nvidia-h100-mega-80gb", "h100"),
        ("node.kubernetes.io/instance-type", "p5en.48xlarge", "h200"),
        ("node.kubernetes.io/instance-type", "m7i.48xlarge", None),
    ],
)
def test_the_gpu_comes_from_the_label_the_spec_names(
    label: str, value: str, product: str | None
) -> None:
    spec = job_with(resources={"gpusPerNode": 8}, scheduling={"nodeSelector": {label: value}})
    assert gpu_product(spec.spec) == product


def test_plan_states_time_and_gpu_hours_at_its_utilisation() -> None:
    spec = example("qwen3-8b-lora").spec.model_copy(deep=True)
    spec.dpo.max_steps = 2000
    shape = model_shape(spec)
    assert shape is not None
    estimate = estimate_compute(spec, shape)
    assert estimate.tokens_per_step == 64 * 2 * 2048
    seconds = estimate.flops_per_step / (8 * PEAK_BF16_FLOPS["h100"] * UTILISATION)
    assert estimate.seconds_per_step == pytest.approx(seconds)
    assert estimate.gpu_hours == pytest.approx(seconds * 2000 * 8 / 3600)
    lines = describe_compute(estimate)
    print("\n".join(lines))
    assert "8 x H100 at 40% of 989 TFLOP/s bf16; 2000 steps:" in lines[1]
    assert f"~{estimate.gpu_hours:,.0f} GPU-hours" in lines[1]
