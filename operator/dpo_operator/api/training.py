"""The spec groups that say what to train and how: model, data, dpo, peft, resources,
parallelism and network.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from dpo_contract.config import DistributedStrategy
from dpo_contract.fields import (
    LOSS_TYPES,
    ColumnMapping,
    ContractModel,
    DataFormat,
    DataSource,
    LoraSettings,
    LossType,
    ModelRef,
    ShortStr,
    UriStr,
)
from pydantic import BeforeValidator, Field, StrictFloat, StrictInt, WithJsonSchema, field_validator

from dpo_operator.api.cel import Rule, RuledModel
from dpo_operator.api.grammar import (
    ENV_NAME_PATTERN,
    MAX_NODES,
    PARAMETER_COUNT_PATTERN,
    K8sName,
    ParameterCount,
    QualifiedName,
    Quantity,
    check_quantity,
    no_contract_env,
    printable_name,
    source_scheme_rule,
    uri_rules,
)
from dpo_operator.api.limits import EXTRA_TRAINING_FIELDS


class ReferenceModelSpec(ModelRef, RuledModel):
    """A separate frozen reference model."""

    rules = (*uri_rules("name"), source_scheme_rule("name"))


class ModelSpec(RuledModel):
    """The policy to train and, optionally, a separate reference model."""

    rules = (
        *uri_rules("name"),
        source_scheme_rule("name"),
        Rule(
            "!self.name.matches('^-|\\\\s')",
            "may not start with '-' or hold a space or line break: the serve line names the "
            "base model (a leading '-' reads as a vLLM flag), and so do adapter_config.json and "
            "the OCI annotations",
            ".name",
        ),
    )

    name: UriStr = Field(
        description="Hub id (org/model), local path, storage URI, or builtin:tiny-<name> for a "
        "tiny model built locally (tests, quickstart)."
    )
    revision: ShortStr | None = Field(
        default=None, description="Hub branch, tag or commit; pin it for reproducible runs."
    )
    reference: ReferenceModelSpec | None = Field(
        default=None,
        description="A separate frozen reference model. Default: the policy itself (with LoRA, "
        "the adapter disabled, so no second copy is loaded).",
    )
    parameters: ParameterCount | None = Field(
        default=None,
        description="Parameter count (e.g. 70B, 8.03B) for the memory plan, when the model is "
        "none of the builtin or well-known ones `dpo plan` recognises by name.",
    )
    trust_remote_code: bool = Field(
        default=False, description="Run model code shipped in the checkpoint (security risk)."
    )
    initialize: bool = Field(
        default=True,
        description="Before any GPU is asked for, a CPU pod resolves the model, counts it on the "
        "meta device for the plan and copies a hub model once into the run's storage. Builtin "
        "models skip it; false skips it for any model.",
    )

    @field_validator("parameters")
    @classmethod
    def _parameter_count(cls, value: str | int | None) -> str | int | None:
        if value is not None and not re.match(PARAMETER_COUNT_PATTERN, str(value)):
            raise ValueError(
                f"{value!r} is not a parameter count; write e.g. 70B, 8.03B, 500M or 7615616512"
            )
        return value


class DataSourceSpec(DataSource, RuledModel):
    """Preference pairs: a hub dataset (`name` + `split`) or jsonl/parquet files (`uri`)."""

    rules = (
        Rule(
            "has(self.name) != has(self.uri)",
            "set exactly one of name (a hub dataset) or uri (jsonl/parquet files)",
        ),
        *uri_rules("uri"),
        source_scheme_rule("uri"),
    )


class HoldOutSpec(ContractModel):
    """With the gate on and no eval data (data.eval and evalGate.data unset), a part of the
    training pairs is held out for evaluation and the gate, and never trained on: those whose
    prompt hashes into the first `fraction`, every pair of a prompt on one side, the same split
    in every run."""

    fraction: StrictFloat = Field(
        default=0.05, gt=0, le=0.5, description="Share of prompts held out."
    )
    max_pairs: StrictInt = Field(default=2000, ge=1, description="Most pairs held out.")


class DataSpec(ContractModel):
    """Preference pairs (prompt, chosen, rejected) to train and evaluate on."""

    train: DataSourceSpec = Field(description="Training pairs.")
    eval: DataSourceSpec | None = Field(
        default=None,
        description="Held-out pairs for evaluation logs and, by default, the gate (default: a "
        "hold-out of the training pairs).",
    )
    hold_out: HoldOutSpec = Field(
        default_factory=HoldOutSpec,
        description="The hold-out of the training pairs used when there is no eval data.",
    )
    format: DataFormat = Field(
        default="auto",
        description="standard (text columns), conversational (lists of messages) or auto.",
    )
    columns: ColumnMapping = Field(
        default_factory=ColumnMapping, description="The dataset's own column names."
    )


# `dpo.lossType` is one name or a list, as TRL's DPOConfig takes it. A structural schema has no
# string-or-list type and the API server runs no CEL on an untyped field, so the CRD leaves it
# untyped and the operator checks it (and the rules that read it: Rule.api_server), as `dpo
# validate` does. The models hold a list.
LossTypes = Annotated[
    list[LossType],
    BeforeValidator(lambda value: _one_loss_as_list(value)),
    WithJsonSchema({"x-kubernetes-preserve-unknown-fields": True}),
]


def _one_loss_as_list(value: Any) -> Any:
    """One loss name, as TRL takes it, is a list of one; an unknown one is named as given."""
    if not isinstance(value, str):
        return value
    if value not in LOSS_TYPES:
        raise ValueError(f"{value!r} is not a loss type; use one of {', '.join(LOSS_TYPES)}")
    return [value]


class DPOSpec(RuledModel):
    """DPO hyper-parameters (TRL DPOConfig; CPOConfig for simpo)."""

    rules = (
        Rule(
            "!('simpo' in self.lossType) || size(self.lossType) == 1",
            "simpo is reference-free and runs through TRL's CPO trainer: it cannot be combined "
            "with other loss types",
            ".lossType",
            quoting="'simpo is reference-free and runs through TRL\\'s CPO trainer: it cannot be "
            "combined with other loss types, got ' + self.lossType.join(', ')",
            api_server=False,
        ),
        Rule(
            "!has(self.lossWeights) || size(self.lossWeights) == size(self.lossType)",
            "needs as many entries as lossType: give one weight per loss type",
            ".lossWeights",
            api_server=False,
        ),
        Rule(
            "!('simpo' in self.lossType) || !self.precomputeRefLogProbs",
            "simpo uses no reference model, so there are no reference log-probs to precompute",
            ".precomputeRefLogProbs",
            api_server=False,
        ),
    )

    beta: StrictFloat = Field(
        default=0.1,
        gt=0,
        le=100,
        description="Strength of the pull towards the reference: too low drifts and reward-hacks, "
        "too high learns nothing. 0.1 for sigmoid; 2.0 is typical for sigmoid_norm and simpo.",
    )
    loss_type: LossTypes = Field(
        default=["sigmoid"],
        min_length=1,
        max_length=8,
        description="One loss, e.g. sigmoid_norm (as TRL takes it), or several summed with "
        "lossWeights, e.g. [sigmoid, sft] for RPO. sigmoid_norm is length-normalised DPO; simpo "
        "is reference-free SimPO (TRL's CPO trainer) and must stand alone.",
    )
    loss_weights: list[StrictFloat] | None = Field(
        default=None, max_length=8, description="One weight per lossType entry (default all 1.0)."
    )
    simpo_gamma: StrictFloat = Field(
        default=0.5, ge=0, description="SimPO's target reward margin (simpo only)."
    )
    learning_rate: StrictFloat | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Peak learning rate. Default: 1e-5 with LoRA, 1e-6 for full fine-tuning.",
    )
    epochs: StrictFloat = Field(
        default=1.0, gt=0, le=1000, description="Passes over the training set."
    )
    max_steps: StrictInt | None = Field(
        default=None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    per_device_batch_size: StrictInt = Field(
        default=4, ge=1, le=4096, description="Pairs per GPU (or per process on CPU) per step."
    )
    gradient_accumulation_steps: StrictInt = Field(
        default=1, ge=1, le=4096, description="Micro-batches accumulated per optimizer step."
    )
    global_batch_size: StrictInt | None = Field(
        default=None,
        ge=1,
        le=1 << 20,
        description="Pairs per optimizer step over every GPU. Set, each step sees the same pairs "
        "at any size: gradientAccumulationSteps is derived (globalBatchSize / (perDeviceBatchSize "
        "x GPUs)), and resources may change after training started (suspend, edit "
        "resources.nodes, resume: the run goes on from its checkpoint at the new size).",
    )
    max_length: StrictInt = Field(
        default=1024, ge=8, le=1048576, description="Maximum tokens of prompt + response."
    )
    precompute_ref_log_probs: bool = Field(
        default=False,
        description="Compute the reference log-probs once before training and free the "
        "reference: saves memory and time per step when the reference is a separate model.",
    )
    # numpy's seeds (the data order) stop at 2**32 - 1.
    seed: StrictInt = Field(
        default=42, ge=0, le=2**32 - 1, description="Random seed for data order and init."
    )
    logging_steps: StrictInt = Field(
        default=10, ge=1, description="Steps between metric updates (Prometheus, status)."
    )
    save_steps: StrictInt = Field(
        default=200, ge=1, description="Steps between checkpoints; a restart resumes from the last."
    )
    extra: dict[str, Any] = Field(
        default_factory=dict,
        max_length=64,
        description="Rarely used DPOConfig fields in snake_case (e.g. label_smoothing, "
        "warmup_steps, lr_scheduler_type), from an allowlist; their values are checked against "
        "DPOConfig when training starts.",
        # The allowed fields, each of any type, and no other: the API server refuses (or, for a
        # client that does not ask for strict validation, drops) any other key.
        json_schema_extra={
            "properties": {
                name: {"x-kubernetes-preserve-unknown-fields": True}
                for name in EXTRA_TRAINING_FIELDS
            },
            "additionalProperties": False,
        },
    )

    @field_validator("extra")
    @classmethod
    def _extra_allowed(cls, extra: dict[str, Any]) -> dict[str, Any]:
        refused = sorted(set(extra) - set(EXTRA_TRAINING_FIELDS))
        if refused:
            named = ", ".join(printable_name(key) for key in refused)
            raise ValueError(
                f"may not set {named}; allowed, in snake_case as TRL's DPOConfig "
                f"names them: {', '.join(EXTRA_TRAINING_FIELDS)} (the spec's own fields set the "
                "rest, e.g. spec.dpo.beta)"
            )
        return extra


class PeftSpec(LoraSettings):
    """LoRA adapter training; disabled means a full fine-tune."""

    enabled: bool = Field(
        default=True,
        description="Train a LoRA adapter (default). false trains every weight (full fine-tune).",
    )


class ResourcesSpec(ContractModel):
    """Machines and what each pod asks for."""

    nodes: StrictInt = Field(
        default=1, ge=1, le=MAX_NODES, description="Number of machines (one pod each)."
    )
    gpus_per_node: StrictInt = Field(
        default=1, ge=0, le=16, description="GPUs per pod; 0 trains on CPU (tests, quickstart)."
    )
    gpu_resource_name: QualifiedName = Field(
        default="nvidia.com/gpu", description="Extended resource name of the GPU device plugin."
    )
    cpu: Quantity | None = Field(default=None, description="CPU request per pod, e.g. 32.")
    memory: Quantity | None = Field(
        default=None, description="Memory request and limit, e.g. 512Gi."
    )
    shm_size: Quantity = Field(
        default="16Gi", description="Size of /dev/shm (RAM-backed) for NCCL and data loaders."
    )
    ephemeral_storage: Quantity | None = Field(
        default=None,
        description="Local disk per pod (its /tmp): requested, and the size limit of /tmp. "
        "Default: from the plan (the model's download, two checkpoint shares staged for the "
        "object store, the pod's part of the export). A job in a Kueue queue requests it only "
        "when set here (its ClusterQueue must then cover ephemeral-storage).",
    )
    gpu_memory: Quantity | None = Field(
        default=None,
        description="Memory of one GPU, e.g. 80Gi, for the memory plan. Default: read from a GPU "
        "product label in scheduling.nodeSelector (nvidia.com/gpu.product, "
        "cloud.google.com/gke-accelerator, node.kubernetes.io/instance-type).",
    )

    @field_validator("cpu", "memory", "shm_size", "ephemeral_storage", "gpu_memory")
    @classmethod
    def _quantity(cls, value: str | int | None) -> str | None:
        return None if value is None else check_quantity(value)


# What a DPOJob asks for: a strategy by name, or `auto` (the memory plan chooses).
StrategyChoice = Literal["auto", DistributedStrategy]


class ParallelismSpec(ContractModel):
    """How the model is spread over GPUs."""

    strategy: StrategyChoice = Field(
        default="auto",
        description="ddp replicates the model; fsdp shards it over all GPUs; hsdp shards inside a "
        "node and replicates across nodes. auto: one process needs none; LoRA and CPU use ddp; "
        "a full fine-tune uses fsdp on one node and hsdp on several.",
    )
    activation_checkpointing: bool = Field(
        default=True, description="Recompute activations in backward: less memory, ~30% slower."
    )
    cpu_offload: bool = Field(
        default=False, description="Offload sharded parameters to CPU memory (fsdp/hsdp only)."
    )


NetworkProfile = Literal["tcp", "infiniband", "roce", "efa", "tcpxo"]
# An HCA as NCCL names it, with an optional port: mlx5_0, mlx5_ib3:1.
HCA_PATTERN = r"^[A-Za-z][A-Za-z0-9_]*(:[0-9]{1,2})?$"


class PreflightSpec(ContractModel):
    """All ranks, after rendezvous and before loading anything: all-reduce and all-gather over
    four sizes up to maxMessageMiB (bus bandwidth as nccl-tests computes it), then a message
    both ways between neighbouring pods to name the slowest pair of nodes."""

    enabled: bool = Field(default=True, description="false skips it.")
    max_message_mib: StrictInt | None = Field(
        default=None,
        alias="maxMessageMiB",
        ge=1,
        le=4096,
        description="The largest message. Default: 256 on GPUs, 4 on CPUs.",
    )
    min_bus_bandwidth_gbps: StrictFloat | None = Field(
        default=None,
        alias="minBusBandwidthGBps",
        gt=0,
        le=10_000,
        description="Fail the run (FabricSlow, naming the slowest pair of nodes) when the "
        "largest all-reduce's bus bandwidth is lower, e.g. 300 for 8 x H100 over 400G "
        "InfiniBand. Default: record it, never fail.",
    )


class NetworkSpec(RuledModel):
    """The fabric between nodes; each profile sets the NCCL variables and pod pieces it needs."""

    rules = (
        Rule(
            "!has(self.profile) || !(self.profile in ['roce', 'tcpxo']) || "
            "(has(self.secondaryNetworks) && size(self.secondaryNetworks) > 0)",
            "roce and tcpxo need them: list the Multus attachments (roce) or GKE networks (tcpxo) "
            "of the GPU NICs",
            ".secondaryNetworks",
            quoting="'profile ' + self.profile + ' needs them: list the Multus attachments (roce) "
            "or GKE networks (tcpxo) of the GPU NICs'",
        ),
        Rule(
            f"!has(self.env) || self.env.all(name, name.matches('{ENV_NAME_PATTERN}'))",
            "keys must be environment variable names: letters, digits, '_', '-' and '.', not "
            "starting with a digit",
            ".env",
        ),
        no_contract_env("env", "", "remove them (NCCL and libfabric variables are for here)"),
    )

    profile: NetworkProfile = Field(
        default="tcp",
        description="tcp (any cluster), infiniband, roce, efa (AWS) or tcpxo (GKE A3 Mega).",
    )
    env: dict[str, Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=dict,
        max_length=64,
        description="Overrides of the profile's NCCL/FI variables (these win).",
    )
    rdma_resource: QualifiedName | None = Field(
        default=None,
        description="RDMA device resource. Default: rdma/ib (infiniband), rdma/roce (roce), "
        "vpc.amazonaws.com/efa (efa).",
    )
    rdma_devices: StrictInt | None = Field(
        default=None,
        ge=1,
        le=64,
        description="RDMA devices per pod (infiniband, roce, efa). Default: the instance type's "
        "(node.kubernetes.io/instance-type in scheduling.nodeSelector: 32 on p5.48xlarge, 4 on "
        "p4d.24xlarge, 8 on ND H100 v5, ...); required when the type is not known.",
    )
    hcas: list[Annotated[str, Field(pattern=HCA_PATTERN, max_length=64)]] = Field(
        default_factory=list,
        max_length=32,
        description="infiniband, roce: the GPU NICs' HCAs, e.g. [mlx5_0, mlx5_1] (port 1 unless "
        "written mlx5_0:2), rendered as NCCL's exact list (NCCL_IB_HCA==mlx5_0:1,...) so no "
        "front-end or storage NIC is picked. Default: the instance type's; required otherwise.",
    )
    gid_index: StrictInt | None = Field(
        default=None,
        ge=0,
        le=255,
        description="roce: NCCL_IB_GID_INDEX. Default: unset, NCCL picks the RoCE v2 GID itself.",
    )
    on_mismatch: Literal["fail", "warn"] = Field(
        default="fail",
        description="When NCCL's real transport is not the profile's (sockets on infiniband, no "
        "GPUDirect RDMA between nodes where the profile uses it): fail the run (FabricMismatch), "
        "or warn: Degraded with reason FabricMismatch, training goes on.",
    )
    preflight: PreflightSpec = Field(
        default_factory=lambda: PreflightSpec(),
        description="The bandwidth check all ranks run before training.",
    )
    secondary_networks: list[K8sName] = Field(
        default_factory=list,
        max_length=16,
        description="roce: Multus NetworkAttachmentDefinitions; tcpxo: the GKE networks of the "
        "8 GPU NICs, in NIC order.",
    )
    collective_timeout_seconds: StrictInt = Field(
        default=600,
        ge=60,
        le=86400,
        description="A collective of a training step that hangs longer (a lost or stuck node) "
        "aborts the run so it can be restarted; checkpoint uploads run beside the steps and "
        "never count against it.",
    )
    transfer_timeout_seconds: StrictInt | None = Field(
        default=None,
        ge=60,
        le=7 * 86400,
        description="The collectives around the long transfers (startup: download, load, shard, "
        "reference precompute; the end: export) and each rank's wait for its checkpoint uploads. "
        "Default: from the plan, 30 minutes plus the model's and a pod's checkpoint share's "
        "bytes at 100 MiB/s.",
    )
