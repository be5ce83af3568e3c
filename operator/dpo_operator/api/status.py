"""The DPOJob's status. The schema is strict: the API server prunes any field it does not
declare.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, get_args

from dpo_contract.config import DegradedReason
from dpo_contract.fields import ContractModel
from dpo_contract.reports import FabricSummary, GateCriterion
from pydantic import Field, StrictFloat, StrictInt

from dpo_operator.api.delivery import OutputSpec

Phase = Literal[
    "Pending",
    "Initializing",
    "Queued",
    "Training",
    "Evaluating",
    "AwaitingApproval",
    "Promoting",
    "Succeeded",
    "Rejected",
    "Failed",
    "Suspended",
    "Stopped",
]
PHASES: tuple[str, ...] = get_args(Phase)
TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "Rejected", "Failed", "Stopped"})


class Condition(ContractModel):
    """A Kubernetes-style condition (type, status, reason, message)."""

    type: Annotated[str, Field(max_length=316)]
    status: Literal["True", "False", "Unknown"]
    reason: Annotated[str, Field(max_length=1024)] = ""
    message: Annotated[str, Field(max_length=32768)] = ""
    last_transition_time: datetime | None = None
    observed_generation: StrictInt | None = None


class TrainingMetrics(ContractModel):
    """Latest values read from rank 0's /metrics."""

    step: StrictInt | None = None
    loss: StrictFloat | None = None
    reward_accuracy: StrictFloat | None = None
    reward_margin: StrictFloat | None = None
    eval_step: StrictInt | None = Field(
        default=None, description="The step of the latest evaluation during training."
    )
    eval_reward_margin: StrictFloat | None = Field(
        default=None, description="The held-out mean reward margin at the latest evaluation."
    )
    eval_reward_margin_low: StrictFloat | None = Field(
        default=None, description="Its interval's lower bound (at evalGate.confidence)."
    )
    eval_reward_margin_high: StrictFloat | None = Field(
        default=None, description="Its interval's upper bound."
    )
    degraded: list[DegradedReason] = Field(
        default_factory=list,
        max_length=8,
        description="The health signals that hold at the latest log (dpo_train_degraded).",
    )
    max_steps: StrictInt | None = Field(default=None, description="Steps the run takes in all.")
    seconds_per_step: StrictFloat | None = Field(
        default=None, description="Measured seconds per step between rank 0's latest logs."
    )
    straggler: Annotated[str, Field(max_length=1024)] | None = Field(
        default=None, description="The rank named a Straggler, its pod and node, and how slow."
    )
    updated_at: datetime | None = None


class ModelStatus(ContractModel):
    """The model as the initializer found it: what the plan was made from."""

    name: Annotated[str, Field(max_length=1024)]
    revision: Annotated[str, Field(max_length=253)] | None = Field(
        default=None, description="The hub commit the revision resolved to."
    )
    parameters: StrictInt = Field(description="Counted on the meta device, tied weights once.")
    active_parameters: StrictInt | None = Field(
        default=None, description="Per token, for a mixture of experts."
    )
    hidden: StrictInt
    layers: StrictInt
    intermediate: StrictInt = Field(description="The MLP width a token goes through.")
    vocab: StrictInt
    kv_ratio: StrictFloat = Field(description="Key/value width over hidden width.")
    largest_tensor: StrictInt = Field(description="Elements of the largest weight.")
    dtype: Annotated[str, Field(max_length=32)] | None = None
    bytes_on_disk: StrictInt
    staged: Annotated[str, Field(max_length=1024)] | None = Field(
        default=None, description="The copy in the run's storage the training pods read."
    )


class ProgressStatus(ContractModel):
    """How far training is, and when it will be done at the measured pace."""

    percent: StrictFloat
    eta_seconds: StrictInt | None = Field(
        default=None, description="Steps left times the measured seconds per step."
    )
    summary: Annotated[str, Field(max_length=64)] = Field(
        description="e.g. 42% ETA 1h20m (the Progress column)."
    )
    gpu_hours: StrictFloat | None = Field(
        default=None, description="Once trained: the training's wall time times its GPUs."
    )


class PlanStatus(ContractModel):
    """What the plan decided when the training Job was created (`dpo plan` shows the table)."""

    layout: Annotated[str, Field(max_length=64)] = Field(description="e.g. fsdp 16, hsdp 2x8.")
    parameters: StrictInt | None = None
    model_source: Annotated[str, Field(max_length=256)] | None = Field(
        default=None, description="Where the size came from: a config.json, a known model, ..."
    )
    gpu_memory: Annotated[str, Field(max_length=32)] | None = Field(
        default=None, description="Planned bytes per GPU of the chosen layout."
    )
    gpu_budget: Annotated[str, Field(max_length=32)] | None = Field(
        default=None, description="The usable part of one GPU's memory it must fit."
    )
    host_memory: Annotated[str, Field(max_length=32)] | None = Field(
        default=None, description="Host memory each pod holds while it loads the model."
    )
    disk: Annotated[str, Field(max_length=32)] = Field(description="Local disk each pod asks for.")
    seconds_per_step: StrictFloat | None = Field(
        default=None, description="The compute estimate, at the utilisation `dpo plan` states."
    )


class HeldOutStatus(ContractModel):
    """The pairs the gate scored, when held out of the training data."""

    source: Annotated[str, Field(max_length=1024)]
    fraction: StrictFloat
    max_pairs: StrictInt
    pairs: StrictInt
    prompts: StrictInt


class EvaluationStatus(ContractModel):
    verdict: Literal["Passed", "Rejected", "Inconclusive"]
    adapter_digest: Annotated[str, Field(max_length=128)] | None = Field(
        default=None,
        description="The adapter the gate judged: a manual promotion is approved for it alone "
        "(dpo.dev/approve=<this digest>).",
    )
    criteria: list[GateCriterion] = Field(default_factory=list, max_length=32)
    held_out: HeldOutStatus | None = None


class PromotionStatus(ContractModel):
    version: Annotated[str, Field(max_length=128)]
    uri: Annotated[str, Field(max_length=1024)]
    digest: Annotated[str, Field(max_length=128)]
    at: datetime | None = None
    vllm_serve: Annotated[str, Field(max_length=4096)] | None = Field(
        default=None,
        description="A vLLM command line that serves the base model with this adapter.",
    )
    vllm_load_request: Annotated[str, Field(max_length=4096)] | None = Field(
        default=None,
        description="The request that loads this adapter into a running vLLM "
        "(VLLM_ALLOW_RUNTIME_LORA_UPDATING=True).",
    )


class DPOJobStatus(ContractModel):
    phase: Phase | None = None
    message: Annotated[str, Field(max_length=32768)] | None = None
    conditions: list[Condition] = Field(default_factory=list, max_length=32)
    observed_generation: StrictInt | None = None
    attempt: StrictInt | None = Field(default=None, description="Training attempt (1 + restarts).")
    restarts: StrictInt = 0
    start_time: datetime | None = None
    completion_time: datetime | None = None
    suspended_at: datetime | None = Field(
        default=None, description="When the current suspension (or approval wait) began."
    )
    suspended_seconds: StrictFloat = Field(
        default=0.0,
        description="Time spent suspended or awaiting approval; not counted against the deadline.",
    )
    waiting_since: datetime | None = Field(
        default=None,
        description="When the current Job was created (or admitted by Kueue): "
        "runPolicy.startupTimeoutSeconds for its pods to start counts from here.",
    )
    children_deleted: bool = Field(
        default=False,
        description="ttlSecondsAfterFinished removed the child Jobs; they are never re-created.",
    )
    output: OutputSpec | None = Field(
        default=None,
        description="Where the run's artifacts go, recorded at its start (the installation's "
        "default, for a DPOJob that names none, cannot move them later).",
    )
    model: ModelStatus | None = Field(
        default=None, description="The model initializer's report: exact size and where it is."
    )
    plan: PlanStatus | None = None
    metrics: TrainingMetrics | None = None
    progress: ProgressStatus | None = None
    fabric: FabricSummary | None = Field(
        default=None,
        description="What the collectives really ran over (NCCL's transport, GPUDirect RDMA, "
        "NICs) and the preflight's all-reduce bus bandwidth and slowest pair of nodes.",
    )
    evaluation: EvaluationStatus | None = None
    promotion: PromotionStatus | None = None
