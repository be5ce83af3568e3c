"""The pod contract between the operator and the trainer.

Everything a training, eval or promote pod receives is defined here: the files mounted at
/etc/dpo, the environment variables, the exit codes and the trainer config schema. The operator
renders it (`dpo_operator.render`), the trainer reads it. Pydantic only: no torch, so the operator
can import it.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    TypeAdapter,
    ValidationError,
)
from pydantic.alias_generators import to_camel

# Files mounted into every pod from the DPOJob's ConfigMap.
CONFIG_DIR = "/etc/dpo"
TRAINER_CONFIG_FILE = "trainer.json"
ACCELERATE_CONFIG_FILE = "accelerate.yaml"
TRAINER_CONFIG_PATH = f"{CONFIG_DIR}/{TRAINER_CONFIG_FILE}"
ACCELERATE_CONFIG_PATH = f"{CONFIG_DIR}/{ACCELERATE_CONFIG_FILE}"
TERMINATION_LOG = "/dev/termination-log"
# Where the short JSON summary goes; tests and `dpo run` point it elsewhere.
ENV_TERMINATION_LOG = "DPO_TERMINATION_LOG"

# Environment variables every training pod receives.
ENV_JOB = "DPO_JOB"
ENV_NAMESPACE = "DPO_NAMESPACE"
ENV_NNODES = "NNODES"
ENV_NPROC_PER_NODE = "NPROC_PER_NODE"
ENV_NODE_RANK = "NODE_RANK"
ENV_MASTER_ADDR = "MASTER_ADDR"
ENV_MASTER_PORT = "MASTER_PORT"
ENV_METRICS_PORT = "DPO_METRICS_PORT"
# Directories the launcher appends to the image's LD_LIBRARY_PATH (a node's NCCL plugin).
ENV_LIBRARY_PATH = "DPO_LIBRARY_PATH"

DEFAULT_MASTER_PORT = 29500
DEFAULT_METRICS_PORT = 9400

# Exit codes: the operator decides whether to retry from these alone.
EXIT_OK = 0
EXIT_BAD_INPUT = 2  # bad config or data: retrying cannot help
EXIT_GATE_REJECTED = 3  # eval only: the adapter failed a gate criterion
# The pod's devices or distributed setup differ from what was rendered (no CUDA where GPUs were
# asked for, fewer GPUs, a strategy the launcher did not keep): the run stops before training.
EXIT_WRONG_ENVIRONMENT = 4
# promote only: another run promoted to the target after this one's gate compared with the
# adapter promoted then; the verdict no longer holds (never retried).
EXIT_CHAMPION_CHANGED = 5


class BadInputError(Exception):
    """Bad config or data: the trainer exits with EXIT_BAD_INPUT and the run is never retried.

    The message names the file (and row and column, for data) and says what to do.
    """


class ChampionChangedError(Exception):
    """The gate beat an adapter that is no longer the promoted one: the trainer exits with
    EXIT_CHAMPION_CHANGED and the run is not promoted."""


class WrongEnvironmentError(Exception):
    """What runs differs from what was rendered: the trainer exits with EXIT_WRONG_ENVIRONMENT.

    The message says what was expected, what was found, and what to change.
    """


# The loss types TRL's DPOConfig accepts (trl>=1.0, `DPOConfig.loss_type`), plus reference-free
# SimPO, which runs through TRL's CPO trainer and so cannot be combined with the others. The
# trainer test tier checks this list against the installed TRL so it cannot drift.
LossType = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
    "simpo",
]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
SIMPO = "simpo"
DPO_LOSS_TYPES: tuple[str, ...] = tuple(t for t in LOSS_TYPES if t != SIMPO)

ShortStr = Annotated[str, Field(min_length=1, max_length=253)]
UriStr = Annotated[str, Field(min_length=1, max_length=1024)]


class ContractModel(BaseModel):
    """Base of every contract and API model: camelCase in JSON/YAML, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )


class ModelRef(ContractModel):
    """A model by hub id, local path or storage URI, at an optional revision."""

    name: UriStr = Field(
        description="Hub id (org/model), local path, or storage URI (pvc://claim/path, s3://...).",
    )
    revision: ShortStr | None = Field(
        default=None, description="Hub branch, tag or commit; pin it for reproducible runs."
    )


class DataSource(ContractModel):
    """Preference pairs: a hub dataset (`name` + `split`) or jsonl/parquet files (`uri`); the
    DPOJob API requires exactly one (`dpo_operator.api.DataSourceSpec`)."""

    name: ShortStr | None = Field(default=None, description="Hub dataset id, e.g. org/prefs.")
    split: ShortStr = Field(default="train", description="Dataset split (hub datasets only).")
    revision: ShortStr | None = Field(default=None, description="Hub dataset revision.")
    uri: UriStr | None = Field(
        default=None,
        description="jsonl or parquet file(s): local path, pvc://claim/path or s3://bucket/key.",
    )


class ColumnMapping(ContractModel):
    """Names of the dataset's own columns holding the prompt, chosen and rejected responses."""

    prompt: ShortStr = Field(default="prompt", description="Column with the prompt.")
    chosen: ShortStr = Field(default="chosen", description="Column with the preferred response.")
    rejected: ShortStr = Field(
        default="rejected", description="Column with the dispreferred response."
    )


DataFormat = Literal["auto", "standard", "conversational"]


class LoraSettings(ContractModel):
    """LoRA adapter settings (PEFT)."""

    r: StrictInt = Field(default=16, ge=1, le=1024, description="LoRA rank.")
    alpha: StrictInt = Field(default=32, ge=1, le=4096, description="LoRA scaling alpha.")
    dropout: StrictFloat = Field(default=0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default=["all-linear"],
        max_length=64,
        description='Modules to adapt; ["all-linear"] adapts every linear layer but the head.',
    )


# ---------------------------------------------------------------------------------------------
# trainer.json: the fully resolved configuration a trainer process runs with. No defaults left
# to guess: the operator fills in everything, so what a pod does is visible in its ConfigMap.


class JobIdentity(ContractModel):
    name: ShortStr
    namespace: ShortStr
    uid: ShortStr


class HoldOut(ContractModel):
    """Training pairs held out for evaluation and the gate when no eval data is given: the
    pairs whose prompt hashes below `fraction` (every pair of a prompt on one side), at most
    `max_pairs` of them (dpo_trainer.data.split_held_out)."""

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
    ddp_timeout_seconds: int = Field(ge=1)
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
HealthAction = Literal["warn", "stop"]
# 1 while the signal `reason` holds: rank 0's /metrics, read by the operator and Prometheus.
DEGRADED_METRIC = "dpo_train_degraded"
# What each signal usually means, and what to try: shown with the signal everywhere.
HEALTH_ADVICE: dict[HealthReason, str] = {
    "NonFiniteLoss": "lower learningRate, or train in bf16 rather than fp16",
    "GradientExplosion": "lower learningRate, or add a warm-up (dpo.extra warmup_steps)",
    "AccuracyStuck": "check the pairs (noisy or flipped chosen/rejected), or lower dpo.beta or "
    "raise learningRate",
    "MarginsCollapsed": "lower learningRate, or stop at the earlier checkpoint",
    "LikelihoodDisplacement": "raise dpo.beta, add an SFT term (dpo.lossType [sigmoid, sft]), or "
    "stop earlier",
}


class HealthConfig(ContractModel):
    """What to do when a health signal is raised: `warn` (report it, train on) or `stop` (end
    training and keep the last checkpoint saved before the signal as the adapter)."""

    action: HealthAction = "warn"
    warmup_steps: int | None = Field(
        default=None,
        ge=0,
        description="Steps before the accuracy and margin signals are judged; None: a tenth of "
        "the run's steps.",
    )


class HealthSignal(ContractModel):
    """A health signal as first raised: the step, and what was seen."""

    reason: HealthReason
    step: int
    message: str = Field(max_length=300)


class StoppedEarly(ContractModel):
    """Training stopped on a health signal (`health.action: stop`)."""

    reason: HealthReason
    step: int
    kept_step: int = Field(description="The checkpoint whose weights are the adapter.")


Strategy = Literal["single", "ddp", "fsdp", "hsdp"]
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
        default=0.95, gt=0.5, lt=1, description="Confidence of the gate's intervals."
    )


class PromotionConfig(ContractModel):
    target: UriStr
    mode: Literal["auto", "manual"]
    served_model_name: ShortStr = Field(
        description="The base model's name where the adapter is served: the adapter's "
        "adapter_config.json names it as base_model_name_or_path."
    )
    plain_http: bool = Field(
        default=False, description="oci:// targets: HTTP instead of HTTPS to the registry."
    )


class TrainerConfig(ContractModel):
    """The content of /etc/dpo/trainer.json."""

    job: JobIdentity
    model: ModelRef
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


# ---------------------------------------------------------------------------------------------
# What the trainer reports: written by the trainer (train.json, eval.json, the promotion
# pointer, and each pod's termination message) and parsed once, with these models, by the
# operator and by `dpo run`.


class DataReport(ContractModel):
    """How many pairs of one source were read, dropped (by reason) and kept."""

    source: str
    read: int
    identical: int
    empty: int
    duplicates: int
    kept: int


FailureStatus = Literal["interrupted", "bad-input", "wrong-environment", "champion-changed"]


class Failure(ContractModel):
    """A command that did not finish; `message` says why and what to do."""

    status: FailureStatus
    message: str


class TrainingSummary(ContractModel):
    """A finished training run, short enough for a termination message."""

    status: Literal["completed"] = "completed"
    step: int
    world_size: int
    distributed: DistributedRun
    adapter_digest: str | None = Field(
        default=None, description="sha256 of the artifact's manifest (rank 0's pod only)."
    )
    parameters_digest: str
    metrics: dict[str, float] = Field(
        default_factory=dict, description="Final values of the summary metrics (rank 0)."
    )
    health: list[HealthSignal] = Field(
        default_factory=list, description="Each health signal raised, as first raised."
    )
    stopped_early: StoppedEarly | None = None


# Under <output>/<namespace>/: precomputed reference log-probs, kept by content for any run there.
REFERENCE_CACHE_DIR = "reference-logps"


class ReferenceLogProbsReport(ContractModel):
    """One set of precomputed reference log-probs: computed, or reused from the cache."""

    split: str
    pairs: int
    key: str | None = Field(description="The cache key (None: no cache configured).")
    reused: bool
    seconds: float


class TrainingReport(TrainingSummary):
    """train.json: the summary and everything behind it."""

    job: JobIdentity
    seconds: float
    eval: dict[str, float]
    data: dict[str, DataReport | None]
    held_out: HeldOutReport | None = None
    reference_log_probs: list[ReferenceLogProbsReport] = Field(default_factory=list)
    settings: TrainerConfig | None = Field(
        default=None, description="The trainer config the run trained with (`dpo compare`)."
    )
    adapter: str
    log_history: list[dict[str, object]]
    memory: dict[str, int]

    def summary(self, summary_metrics: tuple[str, ...]) -> TrainingSummary:
        return TrainingSummary(
            step=self.step,
            world_size=self.world_size,
            distributed=self.distributed,
            adapter_digest=self.adapter_digest,
            parameters_digest=self.parameters_digest,
            metrics={k: v for k, v in self.metrics.items() if k in summary_metrics},
            health=self.health,
            stopped_early=self.stopped_early,
        )


class GateCriterion(ContractModel):
    """One threshold of the gate: the estimate, its interval over `n` samples, the threshold,
    and whether the interval cleared it (`passed`), or only the estimate did (`inconclusive`,
    with the samples that would likely decide it)."""

    name: str
    value: float | None = Field(
        default=None, description="None when there is nothing to measure (nothing promoted yet)."
    )
    low: float | None = None
    high: float | None = None
    n: int | None = None
    method: str | None = Field(
        default=None, description="How the interval was found: wilson, bootstrap, paired-bootstrap."
    )
    threshold: float
    passed: bool
    inconclusive: bool = False
    needed_pairs: int | None = None


GateOutcome = Literal["Passed", "Rejected", "Inconclusive"]


class GateVerdict(ContractModel):
    """The gate's verdict, short enough for a termination message."""

    status: Literal["passed", "rejected", "inconclusive"]
    verdict: GateOutcome
    adapter_digest: str
    criteria: list[GateCriterion]
    message: str | None = None
    held_out: HeldOutReport | None = Field(
        default=None, description="The pairs scored, when held out of the training data."
    )


class GateReport(GateVerdict):
    """eval.json: the verdict and the measurements behind it."""

    metrics: dict[str, float]
    pairs: int
    confidence: float = Field(default=0.95, description="Confidence of the criteria's intervals.")
    # With mustBeatPromoted: the digest of the adapter this one was compared with ("" when none
    # was promoted yet). Promotion refuses when `current` has moved on since.
    champion_digest: str | None = None
    data: DataReport

    def short(self) -> GateVerdict:
        return GateVerdict.model_validate(self.model_dump(include=set(GateVerdict.model_fields)))


class PromotionResult(ContractModel):
    """A promoted adapter: also the content of `<target>/current`."""

    status: Literal["promoted"] = "promoted"
    version: str
    digest: str
    uri: str
    promoted_at: str
    job: JobIdentity


TerminationMessage = Annotated[
    TrainingSummary | GateVerdict | PromotionResult | Failure, Field(discriminator="status")
]
_TERMINATION_MESSAGE: TypeAdapter[TerminationMessage] = TypeAdapter(TerminationMessage)


TERMINATION_MESSAGE_LIMIT = 4096  # what the kubelet keeps of a termination message


def termination_message_json(message: TerminationMessage) -> str:
    """A termination message as the trainer writes it: no null fields; a failure's message cut
    to fit the kubelet's limit."""
    text = message.model_dump_json(by_alias=True, exclude_none=True)
    if len(text.encode()) > TERMINATION_MESSAGE_LIMIT and isinstance(message, Failure):
        text = message.model_copy(update={"message": message.message[:3500]}).model_dump_json(
            by_alias=True, exclude_none=True
        )
    return text


def parse_termination_message(text: str) -> TerminationMessage | None:
    """A pod's termination message, or None when it is none of the trainer's (a crash, or a
    message cut short)."""
    try:
        return _TERMINATION_MESSAGE.validate_json(text)
    except ValidationError:
        return None
