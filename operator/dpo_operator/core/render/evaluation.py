"""The eval-gate Job: one pod that scores the adapter on held-out pairs, sized by the plan."""

from __future__ import annotations

from dpo_contract.pod import EXIT_BAD_INPUT, EXIT_GATE_REJECTED, EXIT_WRONG_ENVIRONMENT

from dpo_operator.core.names import eval_job_name
from dpo_operator.core.plan import GIB
from dpo_operator.core.render.manifest import Manifest
from dpo_operator.core.render.pod import single_pod_job
from dpo_operator.core.resolve import ResolvedJob


def eval_gpus(resolved: ResolvedJob) -> int:
    """GPUs of the eval pod: evalGate.resources.gpus, else as many as the memory plan says the
    bf16 model needs (one when its size is unknown)."""
    spec = resolved.spec
    if resolved.on_cpu:
        return 0
    if spec.eval_gate.resources.gpus is not None:
        return spec.eval_gate.resources.gpus
    return resolved.plan.eval_gpus or 1


def eval_memory(resolved: ResolvedJob) -> str | int | None:
    """Memory of the eval pod: evalGate.resources.memory, else what loading the bf16 model
    takes (when its size is known), else the training pods' memory."""
    spec = resolved.spec
    if spec.eval_gate.resources.memory is not None:
        return spec.eval_gate.resources.memory
    planned = resolved.plan.eval_memory
    return f"{planned // GIB}Gi" if planned else spec.resources.memory


def render_eval_job(resolved: ResolvedJob, attempt: int) -> Manifest:
    """The gate: scores the adapter of training attempt `attempt` on held-out pairs."""
    spec = resolved.spec
    gate = spec.eval_gate.resources
    return single_pod_job(
        resolved,
        eval_job_name(resolved.job, attempt),
        "eval",
        attempt,
        eval_gpus(resolved),
        gate.cpu if gate.cpu is not None else spec.resources.cpu,
        eval_memory(resolved),
        [EXIT_BAD_INPUT, EXIT_GATE_REJECTED, EXIT_WRONG_ENVIRONMENT],
    )
