"""trainer.json: the fully resolved configuration a trainer process runs with."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, ValidationError

from dpo_contract.fields import (
    SIMPO,
    ColumnMapping,
    ContractModel,
    DataFormat,
    DataSource,
    LoraSettings,
    LossType,
    ModelRef,
    PolicyRef,
    ServedName,
    ShortStr,
    UriStr,
)
from dpo_contract.pod import BadInputError


class JobIdentity(ContractModel):
    name: ShortStr
    namespace: ShortStr
    uid: ShortStr


class HoldOut(ContractModel):
    """Training pairs held out for evaluation and the gate when no eval data is given: the
    pairs whose prompt hashes below `fraction` (every pair of a prompt on one side), at most
    `max_pairs` of them (dpo_trainer.io.data.split_held_out)."""

    fraction: float = Field(gt=0, le=0.5)
    max_pairs: int = Field(ge=1)


class HeldOutReport(HoldOut):
    """What a hold-out held out of its source."""

    source: str
    pairs: int
    prompts: int


class DataConfig(ContractModel):
    train: DataSource
    eval: DataSource | None
    format: DataFormat
    columns: ColumnMapping
    hold_out: HoldOut | None = Field(
        default=None,
        description="Set when there is no eval data: the held-out part of `train` is the "
        "eval data, and is never trained on.",
    )


class TrainingConfig(ContractModel):
    loss_type: list[LossType] = Field(min_length=1)
    loss_weights: list[float] | None
    beta: float = Field(gt=0)
    simpo_gamma: float
    learning_rate: float = Field(gt=0)
    num_train_epochs: float = Field(gt=0)
    max_steps: int | None
    per_device_train_batch_size: int = Field(ge=1)
    gradient_accumulation_steps: int = Field(ge=1)
    max_length: int = Field(ge=8)
    precompute_ref_log_probs: bool
    seed: int
    logging_steps: int = Field(ge=1)
    save_steps: int = Field(ge=1)
    gradient_checkpointing: bool
    mixed_precision: Literal["bf16", "no"]
    step_timeout_seconds: int = Field(
        ge=1, description="The collectives of training steps: a hung rank fails the run this soon."
    )
    save_on_signal: bool = Field(
        default=True,
        description="Write a checkpoint on SIGTERM: false when one would not fit in the pods' "
        "grace period (the run then resumes from its last periodic checkpoint).",
    )
    transfer_timeout_seconds: int = Field(
        ge=1,
        description="The collectives of startup (download, load, shard, precompute) and of the "
        "end (export), and each rank's own wait for its checkpoint uploads.",
    )
    extra: dict[str, object]

    @property
    def reference_free(self) -> bool:
        return self.loss_type == [SIMPO]


# What the trainer watches while it trains (dpo_trainer/health.py says when each is raised).
HealthReason = Literal[
    "NonFiniteLoss",
    "GradientExplosion",
    "AccuracyStuck",
    "MarginsCollapsed",
    "LikelihoodDisplacement",
]
HEALTH_REASONS: tuple[HealthReason, ...] = get_args(HealthReason)
# What the trainer sees of the machines under a run (dpo_trainer.train.fabric): NCCL on another
# transport than the profile's (with network.onMismatch: warn), or one rank consistently slower
# than the others. Reported like a health signal, never a reason to stop training.
FabricReason = Literal["FabricMismatch", "Straggler"]
DegradedReason = Literal[HealthReason, FabricReason]
DEGRADED_REASONS: tuple[DegradedReason, ...] = (*HEALTH_REASONS, *get_args(FabricReason))
HealthAction = Literal["warn", "stop"]
# 1 while the signal `reason` holds: rank 0's /metrics, read by the operator and Prometheus.
DEGRADED_METRIC = "dpo_train_degraded"
# The fabric on rank 0's /metrics (dpo_trainer.train.fabric), read by the operator too.
FABRIC_INFO_METRIC = "dpo_fabric_info"
BUS_BANDWIDTH_METRIC = "dpo_fabric_bus_bandwidth_gbps"
PAIR_BANDWIDTH_METRIC = "dpo_fabric_pair_bandwidth_gbps"
RANK_COMPUTE_METRIC = "dpo_rank_compute_seconds"
STRAGGLER_METRIC = "dpo_straggler_ratio"
# What each signal usually means, and what to try: shown with the signal everywhere.
HEALTH_ADVICE: dict[DegradedReason, str] = {
    "NonFiniteLoss": "lower learningRate, or train in bf16 rather than fp16",
    "GradientExplosion": "lower learningRate, or add a warm-up (dpo.extra warmup_steps)",
    "AccuracyStuck": "check the pairs (noisy or flipped chosen/rejected), or lower dpo.beta or "
    "raise learningRate",
    "MarginsCollapsed": "lower learningRate, or stop at the earlier checkpoint",
    "LikelihoodDisplacement": "raise dpo.beta, add an SFT term (dpo.lossType [sigmoid, sft]), or "
    "stop earlier",
    "FabricMismatch": "NCCL is not on the network profile's transport: check the pods' RDMA "
    "devices (network.rdmaDevices), the HCAs (network.hcas) and the image's NCCL plugin",
    "Straggler": "drain or replace the named node (a throttled GPU or CPU, a noisy neighbour), "
    "then resume from the last checkpoint",
}


class HealthConfig(ContractModel):
    """What to do when a health signal is raised: `warn` (report it, train on) or `stop` (end
    training and keep the last checkpoint saved before the signal as the adapter)."""

    action: HealthAction = "warn"
    straggler_factor: float = Field(
        default=1.5,
        gt=1,
        description="A rank whose compute time per step is this many times the median of the "
        "other ranks' at STRAGGLER_WINDOW logs in a row is named a Straggler.",
    )
    warmup_steps: int | None = Field(
        default=None,
        ge=0,
        description="Steps before the accuracy and margin signals are judged; None: a tenth of "
        "the run's steps.",
    )


class HealthSignal(ContractModel):
    """A health signal as first raised: the step, and what was seen."""

    reason: DegradedReason
    step: int
    message: str = Field(max_length=300)


class StoppedEarly(ContractModel):
    """Training stopped on a health signal (`health.action: stop`)."""

    reason: HealthReason
    step: int
    kept_step: int = Field(description="The checkpoint whose weights are the adapter.")


# The strategies a DPOJob may ask for by name; what runs is one of them, or a single process.
DistributedStrategy = Literal["ddp", "fsdp", "hsdp"]
Strategy = Literal["single", DistributedStrategy]
Device = Literal["cuda", "cpu"]


class DistributedConfig(ContractModel):
    """The process layout the operator rendered; the trainer checks that this is what runs."""

    nnodes: int = Field(ge=1)
    nproc_per_node: int = Field(ge=1)
    strategy: Strategy
    fsdp_version: Literal[2] | None = Field(
        default=None, description="FSDP implementation for fsdp and hsdp (2); None otherwise."
    )
    shard_group_size: int | None = Field(
        default=None,
        ge=1,
        description="hsdp: processes sharing one copy of the model (a node's GPUs, or several "
        "nodes' when one node cannot hold it); each such group is a replica.",
    )
    device: Device = Field(
        default="cuda",
        description="cuda: one GPU per process, and no CUDA is an error. cpu: the same process "
        "layout and strategy on CPUs over gloo (tests, `dpo run --cpu`, CPU-only pods).",
    )

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def mesh_shape(self) -> tuple[int, ...] | None:
        """The device mesh the parameters are sharded over: all ranks for fsdp, (replicate
        across nodes, shard within a node) for hsdp; None when nothing is sharded."""
        if self.strategy == "fsdp":
            return (self.world_size,)
        if self.strategy == "hsdp":
            shard = self.shard_group_size or self.nproc_per_node
            return (self.world_size // shard, shard)
        return None


class DistributedRun(ContractModel):
    """What a training run really ran on, read back from accelerate and the parameters."""

    # The termination message leaves out nulls: each optional field defaults to None.
    distributed_type: str = Field(description="accelerate's DistributedType, e.g. FSDP.")
    fsdp_version: int | None = None
    mesh_shape: list[int] | None = Field(
        default=None,
        description="Shape of the mesh the parameters are sharded over (None: not sharded).",
    )
    mesh_dims: list[str] | None = None
    world_size: int
    device: str = Field(description="Device type of the parameters: cuda or cpu.")


# Of the gate's intervals, and of the held-out margin's at each evaluation during training.
DEFAULT_CONFIDENCE = 0.95


class GateConfig(ContractModel):
    gpus: int = Field(
        default=0,
        ge=0,
        description="GPUs of the eval pod; the models are spread over all of them (0: CPU).",
    )
    data: DataSource
    hold_out: HoldOut | None = Field(
        default=None,
        description="Set when `data` is the training data: the gate scores its "
        "held-out part only (the same split as training's).",
    )
    anchor_data: DataSource | None
    max_samples: int | None
    min_reward_accuracy: float | None
    min_reward_margin: float | None
    max_anchor_nll_increase: float | None
    must_beat_promoted: bool
    beat_margin: float
    confidence: float = Field(
        default=DEFAULT_CONFIDENCE, gt=0.5, lt=1, description="Confidence of the gate's intervals."
    )


class PromotionConfig(ContractModel):
    target: UriStr
    mode: Literal["auto", "manual"]
    served_model_name: ServedName = Field(
        description="The base model's name where the adapter is served: the adapter's "
        "adapter_config.json names it as base_model_name_or_path."
    )
    plain_http: bool = Field(
        default=False, description="oci:// targets: HTTP instead of HTTPS to the registry."
    )


# NCCL's name of each transport (`NCCL_NET`, and "Using network X" in its log).
Transport = Literal["Socket", "IB", "AWS Libfabric", "FasTrak"]


class FabricConfig(ContractModel):
    """The fabric the network profile renders, and what the trainer checks of it."""

    profile: str
    transport: Transport = Field(description="The transport NCCL must use between nodes.")
    gpu_direct_rdma: bool = Field(
        description="The NICs must read and write GPU memory directly (GDRDMA in NCCL's log)."
    )
    on_mismatch: Literal["fail", "warn"] = "fail"
    preflight: bool = True
    preflight_max_bytes: int = Field(
        default=64 << 20, ge=1 << 10, description="The largest message of the preflight sweep."
    )
    min_bus_bandwidth_gbps: float | None = Field(
        default=None, gt=0, description="Below this all-reduce bus bandwidth the run fails."
    )


class TrainerConfig(ContractModel):
    """The content of /etc/dpo/trainer.json."""

    job: JobIdentity
    model: PolicyRef
    reference: ModelRef | None = Field(
        description="A separate frozen reference; None means the policy itself (adapter disabled "
        "with LoRA, or a frozen copy of the starting weights without it).",
    )
    trust_remote_code: bool
    data: DataConfig
    training: TrainingConfig
    lora: LoraSettings | None
    distributed: DistributedConfig
    artifacts_dir: UriStr = Field(
        description="<output>/<namespace>/<name>/<uid>: checkpoints/, adapter/, train.json, ..."
    )
    health: HealthConfig = Field(default_factory=HealthConfig)
    fabric: FabricConfig = Field(
        default_factory=lambda: FabricConfig(
            profile="tcp", transport="Socket", gpu_direct_rdma=False
        )
    )
    reference_cache: UriStr | None = Field(
        default=None,
        description="Where precomputed reference log-probs are kept by content and reused "
        "(<output>/<namespace>/reference-logps); None: not precomputed.",
    )
    gate: GateConfig | None
    promotion: PromotionConfig | None
    metrics_port: int = Field(ge=1, le=65535)


def load_trainer_config(path: str) -> TrainerConfig:
    """Read trainer.json; a missing or invalid file is bad input."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as error:
        raise BadInputError(f"{path}: cannot read the trainer config: {error.strerror}") from None
    try:
        return TrainerConfig.model_validate_json(text)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()[:10]
        )
        raise BadInputError(
            f"{path}: not a valid trainer config ({problems}); render it with `dpo render` from "
            "the same release as this trainer"
        ) from None
