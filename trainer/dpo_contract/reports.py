"""What the trainer reports: train.json, eval.json, the promotion pointer and the pieces of
each pod's termination message, written by the trainer and parsed once, with these models, by
the operator and by `dpo run`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from dpo_contract.config import (
    DistributedRun,
    HealthSignal,
    HeldOutReport,
    JobIdentity,
    StoppedEarly,
    TrainerConfig,
)
from dpo_contract.fields import ContractModel


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
    reason: str | None = Field(
        default=None, description="A finer reason than the status, e.g. FabricSlow."
    )


class PodFabric(ContractModel):
    """What one pod's collectives really ran over, read from NCCL's own log (or gloo's)."""

    pod: str
    node: str
    backend: str = Field(description="nccl or gloo.")
    transport: str = Field(description="NCCL's network: IB, Socket, AWS Libfabric, FasTrak.")
    gpu_direct_rdma: bool = Field(description="A channel between nodes ran over GDRDMA.")
    nics: list[str] = Field(default_factory=list, description="The NICs (or HCA ports) used.")
    evidence: list[str] = Field(
        default_factory=list, max_length=8, description="The log lines this was read from."
    )


class CollectiveBandwidth(ContractModel):
    """One size of the preflight sweep, computed as nccl-tests does: algorithm bandwidth is
    bytes over time (the slowest rank's), bus bandwidth scales it by what each link carries."""

    collective: Literal["all_reduce", "all_gather"]
    bytes: int
    seconds: float
    algorithm_gbps: float
    bus_gbps: float


class PairBandwidth(ContractModel):
    """A message sent both ways between the first processes of two pods."""

    pods: list[str]
    nodes: list[str]
    bytes: int
    gbps: float


class Preflight(ContractModel):
    world_size: int
    seconds: float
    collectives: list[CollectiveBandwidth]
    pairs: list[PairBandwidth] = Field(default_factory=list)

    @property
    def bus_bandwidth_gbps(self) -> float | None:
        """The all-reduce's bus bandwidth at the largest size measured."""
        sweep = [c for c in self.collectives if c.collective == "all_reduce"]
        return max(sweep, key=lambda c: c.bytes).bus_gbps if sweep else None

    @property
    def slowest_pair(self) -> PairBandwidth | None:
        return min(self.pairs, key=lambda p: p.gbps) if self.pairs else None


class RankProbe(ContractModel):
    """A rank's compute probe over the run (dpo_trainer.train.fabric): the same fixed work on
    every rank, so a slow node shows apart from the waits every rank shares."""

    rank: int
    pod: str
    node: str
    probes: int
    median_seconds: float


def pair_text(pods: list[str], nodes: list[str], gbps: float) -> str:
    """A pair of pods the preflight measured, as the status says it."""
    return f"{' <-> '.join(pods)} ({' <-> '.join(nodes)}): {gbps:.3g} GB/s"


def straggler_text(rank: object, pod: str, node: str, ratio: float) -> str:
    """A rank named a straggler, as the status says it."""
    return (
        f"rank {rank} (pod {pod} on node {node}) computes {ratio:.1f}x slower than the median "
        "of the other ranks"
    )


class FabricSummary(ContractModel):
    """The fabric in short: the termination message's and `status.fabric`."""

    transport: str
    gpu_direct_rdma: bool
    nics: list[str] = Field(default_factory=list, max_length=64)
    bus_bandwidth_gbps: float | None = None
    slowest_pair: str | None = Field(default=None, max_length=512)


class FabricReport(ContractModel):
    """train.json's `fabric`: every pod's transport and the preflight."""

    pods: list[PodFabric]
    preflight: Preflight | None = None

    def summary(self) -> FabricSummary:
        transports = sorted({p.transport for p in self.pods})
        slowest = self.preflight.slowest_pair if self.preflight else None
        return FabricSummary(
            transport="/".join(transports),
            gpu_direct_rdma=bool(self.pods) and all(p.gpu_direct_rdma for p in self.pods),
            nics=sorted({n for p in self.pods for n in p.nics})[:64],
            bus_bandwidth_gbps=self.preflight.bus_bandwidth_gbps if self.preflight else None,
            slowest_pair=pair_text(slowest.pods, slowest.nodes, slowest.gbps) if slowest else None,
        )


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
    fabric: FabricSummary | None = None
    gpu_hours: float | None = Field(
        default=None, description="Training's wall time times its GPUs (None on CPUs)."
    )


# Under <output>/<namespace>/: precomputed reference log-probs, kept by content for any run there.
REFERENCE_CACHE_DIR = "reference-logps"


class ReferenceLogProbsReport(ContractModel):
    """One set of precomputed reference log-probs: computed, or reused from the cache."""

    split: str
    pairs: int
    key: str | None = Field(description="The cache key (None: no cache configured).")
    reused: bool
    seconds: float


class MixedPrecision(ContractModel):
    """How a sharded run keeps, computes and reduces its parameters and gradients."""

    master_dtype: str = Field(description="The dtype of the sharded trainable weights.")
    param_dtype: str = Field(description="The dtype parameters are gathered in for compute.")
    reduce_dtype: str = Field(description="The dtype gradients are reduced in.")


class PhaseMemory(ContractModel):
    """One rank's memory during one phase of the run (load, reference, train, export)."""

    start_bytes: int = Field(description="Resident host memory when the phase began.")
    peak_bytes: int = Field(description="The most resident host memory during the phase.")
    device_peak_bytes: int | None = Field(
        default=None, description="The most GPU memory allocated during the phase (GPUs only)."
    )


class RankMemory(ContractModel):
    """What one rank held and read, phase by phase."""

    rank: int
    node: int = Field(description="The pod (machine rank) the process ran in.")
    phases: dict[str, PhaseMemory]
    read_bytes: int = Field(
        default=0, description="Bytes of checkpoint tensors this rank read to fill its shards."
    )


class RankCheckpoints(ContractModel):
    """What one rank sent to and fetched from the artifacts' store for its checkpoints."""

    rank: int
    uploaded_bytes: int = Field(default=0, description="Of the checkpoint files it wrote.")
    downloaded_bytes: int = Field(
        default=0, description="Of the checkpoint it resumed from: only what it reads."
    )
    saves: int = Field(default=0, description="Checkpoints it wrote.")
    longest_save_seconds: float = Field(
        default=0.0,
        description="The longest a save held training (DCP's save is a collective: every rank "
        "waits there for the slowest writer; uploads are not in it).",
    )
    upload_seconds: float = Field(default=0.0, description="Its uploads, beside training.")
    wait_seconds: float = Field(
        default=0.0, description="Its own wait, after training, for its uploads to finish."
    )


class TrainedAdapter(ContractModel):
    """A LoRA adapter as training ended, gathered whole from every rank: what the gate checks
    the saved adapter against."""

    tensors_digest: str = Field(
        description="sha256 over every adapter tensor's name, shape, dtype and bytes."
    )
    tensors: int
    base_model: str = Field(description="The base model trained on (model.name).")
    revision: str | None = Field(default=None, description="The base model's revision.")


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
    memory_by_rank: list[RankMemory] = Field(default_factory=list)
    checkpoints_by_rank: list[RankCheckpoints] = Field(default_factory=list)
    trained_adapter: TrainedAdapter | None = Field(
        default=None, description="LoRA runs: the adapter as trained, for the gate's checks."
    )
    mixed_precision: MixedPrecision | None = Field(
        default=None, description="Set when the model was sharded (fsdp, hsdp)."
    )
    fabric_report: FabricReport | None = Field(
        default=None, description="Every pod's transport and the bandwidth preflight."
    )
    compute_by_rank: list[RankProbe] = Field(
        default_factory=list, description="Each rank's compute probe over the run."
    )

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
            fabric=self.fabric_report.summary() if self.fabric_report else None,
            gpu_hours=self.gpu_hours,
        )


# One threshold of the gate: the estimate, its interval over `n` samples, the threshold, and
# whether the interval cleared it (`passed`), or only the estimate did (`inconclusive`, with the
# samples that would likely decide it). Also the DPOJob's status.evaluation.criteria: the bounds
# are for the CRD's schema, and a docstring here would become the CRD's description.
class GateCriterion(ContractModel):
    name: Annotated[str, Field(max_length=128)]
    value: float | None = None  # nothing to measure (mustBeatPromoted, nothing promoted yet)
    low: float | None = None
    high: float | None = None
    n: int | None = None
    # How the interval was found: wilson, bootstrap, paired-bootstrap.
    method: Annotated[str, Field(max_length=32)] | None = None
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


ArtifactCheckName = Literal[
    "shapes", "matchesTrained", "loraBTrained", "changesLogits", "baseModel"
]


class ArtifactCheck(ContractModel):
    """One check of the adapter itself, before it is scored: that it is the one trained,
    complete and servable."""

    name: ArtifactCheckName
    passed: bool
    detail: str


class GateReport(GateVerdict):
    """eval.json: the verdict and the measurements behind it."""

    metrics: dict[str, float]
    pairs: int
    confidence: float = Field(default=0.95, description="Confidence of the criteria's intervals.")
    # With mustBeatPromoted: the digest of the adapter this one was compared with ("" when none
    # was promoted yet). Promotion refuses when `current` has moved on since.
    champion_digest: str | None = None
    data: DataReport
    artifact_checks: list[ArtifactCheck] = Field(default_factory=list)
    pair_margins: list[float] = Field(
        default_factory=list,
        description="Each held-out pair's reward margin, in the order scored: what a sweep "
        "compares its trials by, pair against pair.",
    )

    def short(self) -> GateVerdict:
        return GateVerdict.model_validate(self.model_dump(include=set(GateVerdict.model_fields)))


ConfigScalar = int | float | bool | Annotated[str, Field(max_length=64)]


class ModelReport(ContractModel):
    """What the model initializer found: the model resolved, counted on the meta device and
    (where it stages) copied once into the run's storage."""

    status: Literal["initialized"] = "initialized"
    name: str
    revision: str | None = Field(
        default=None, description="The hub commit the revision resolved to; None off the hub."
    )
    parameters: int = Field(description="Counted on the meta device, tied weights once.")
    largest_tensor: int = Field(description="Elements of the model's largest weight.")
    dtype: str | None = Field(default=None, description="The checkpoint's dtype (config.json).")
    bytes_on_disk: int = Field(description="Bytes of the weight files.")
    files: int = Field(description="Weight files (safetensors shards, ...).")
    staged: str | None = Field(
        default=None, description="The copy in the run's storage training reads; None: none."
    )
    config: dict[str, ConfigScalar] = Field(
        description="config.json's scalar entries (sizes, heads, experts): what planning reads."
    )


class PromotionResult(ContractModel):
    """A promoted adapter: also the content of `<target>/current`."""

    status: Literal["promoted"] = "promoted"
    version: str
    digest: str
    uri: str
    promoted_at: str
    job: JobIdentity
