"""The DPOJob API (dpo.dev/v1alpha1): spec and status as pydantic models.

The CRD's OpenAPI schema is generated from these models (`dpo_operator.crd`). Each cross-field
rule is written once, in CEL, next to the model it governs (`Rule`): the CRD carries it, so
`kubectl apply` refuses a manifest that breaks it, and the model evaluates the same expression,
so `dpo validate`, `dpo run` and the operator refuse it with the same message. Only the memory
plan (`dpo_operator.plan`), arithmetic CEL cannot do, is checked here alone.

The status schema below is strict: the API server prunes any field it does not declare.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, Self, get_args

import celpy
from celpy import celtypes
from celpy.adapter import json_to_cel
from dpo_trainer import oci
from dpo_trainer.config import (
    DEFAULT_MASTER_PORT,
    DEFAULT_METRICS_PORT,
    ENV_JOB,
    ENV_MASTER_ADDR,
    ENV_MASTER_PORT,
    ENV_METRICS_PORT,
    ENV_NAMESPACE,
    ENV_NNODES,
    ENV_NODE_RANK,
    ENV_NPROC_PER_NODE,
    ColumnMapping,
    ContractModel,
    DataFormat,
    DataSource,
    HealthAction,
    HealthReason,
    LoraSettings,
    LossType,
    ModelRef,
    ShortStr,
    UriStr,
)
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StrictFloat,
    StrictInt,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, ErrorDetails

GROUP = "dpo.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DPOJob"
PLURAL = "dpojobs"

# Pod hostnames are `<name>-train-<attempt>-<index>` and must fit a 63-character DNS label:
# 63 - len("-train-") - 3 attempt digits - 1 - 3 index digits = 49.
MAX_NAME_LENGTH = 49
MAX_NODES = 512
MAX_RESTARTS = 100
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

# Kubernetes resource.Quantity, as the core API's own OpenAPI schema writes it.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY = re.compile(QUANTITY_PATTERN)


def _check_quantity(value: str | int) -> str:
    text = str(value)
    if text.startswith(("-", "+")) or not _QUANTITY.match(text):
        raise ValueError(
            f"{value!r} is not a Kubernetes quantity; write e.g. 8, 500m, 64Gi or 1.5Ti"
        )
    return text


_QUANTITY_SUFFIXES = {
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "Pi": 1 << 50,
    "Ei": 1 << 60,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "m": 10**-3,
}


def parse_quantity(value: str | int) -> int:
    """A valid Kubernetes quantity as a whole number (bytes, for memory)."""
    text = str(value)
    number = re.match(r"^[0-9.]+(?:[eE][+-]?[0-9]+)?", text)
    assert number is not None, f"{text!r} was validated as a quantity"
    suffix = text[number.end() :]
    return int(float(number.group()) * _QUANTITY_SUFFIXES.get(suffix, 1))


# A parameter count: 70B, 8.03B, 500M, or a plain integer.
PARAMETER_COUNT_PATTERN = r"^[0-9]+(\.[0-9]+)?[KMBT]?$"
_PARAMETER_SCALE = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
ParameterCount = Annotated[
    str | int,
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": PARAMETER_COUNT_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]


def parse_parameter_count(value: str | int) -> int:
    text = str(value)
    return int(float(text.rstrip("KMBT")) * _PARAMETER_SCALE[text[len(text.rstrip("KMBT")) :]])


Quantity = Annotated[
    str | int,
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]

# Storage URIs for outputs: a PersistentVolumeClaim or an object store. A local path would live in
# the container's own filesystem and vanish with the pod.
STORAGE_URI_PATTERN = r"^(pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?|(s3|gs|gcs|az|abfs)://.+)$"
StorageUri = Annotated[str, Field(min_length=1, max_length=1024, pattern=STORAGE_URI_PATTERN)]
_STORAGE_URI_HINT = "use pvc://<claim>/<path> or an object store URI (s3://, gs://, az://)"
# A promotion target may also be an OCI repository: the version is its tag, so none is given.
PROMOTION_TARGET_PATTERN = (
    STORAGE_URI_PATTERN[:-2] + f"|oci://{oci.REGISTRY_PATTERN}/{oci.REPOSITORY_PATTERN})$"
)
PromotionTarget = Annotated[
    str, Field(min_length=1, max_length=1024, pattern=PROMOTION_TARGET_PATTERN)
]
_PROMOTION_TARGET_HINT = (
    "use pvc://<claim>/<path>, an object store URI (s3://, gs://, az://) or an OCI repository "
    "(oci://<registry>[:<port>]/<repository>, lower case, no tag)"
)

# The pod contract's own variables: a user value would break the rendezvous.
RESERVED_ENV = (
    ENV_JOB,
    ENV_NAMESPACE,
    ENV_NNODES,
    ENV_NPROC_PER_NODE,
    ENV_NODE_RANK,
    ENV_MASTER_ADDR,
    ENV_MASTER_PORT,
    ENV_METRICS_PORT,
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
)
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
EnvName = Annotated[str, Field(min_length=1, max_length=128, pattern=ENV_NAME_PATTERN)]
K8S_NAME_PATTERN = r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$"
K8sName = Annotated[str, Field(min_length=1, max_length=253, pattern=K8S_NAME_PATTERN)]
# Resource names, label keys: an optional DNS-subdomain prefix, '/', then a name.
QUALIFIED_NAME_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
QualifiedName = Annotated[str, Field(min_length=1, max_length=316, pattern=QUALIFIED_NAME_PATTERN)]
LabelMap = Annotated[dict[str, Annotated[str, Field(max_length=253)]], Field(max_length=64)]

# The DPOConfig fields `spec.dpo.extra` may set: optimiser, schedule, loss variants and data
# loading. Everything else is either set by the spec's own fields (beta, batch sizes, output,
# parallelism) or must not be chosen by whoever writes a DPOJob (push_to_hub and the hub_*
# fields publish the model, report_to sends it elsewhere, deepspeed and trust_remote_code run
# code): an allowlist, so that a field TRL adds later is refused until it is reviewed.
EXTRA_TRAINING_FIELDS = (
    "activation_offloading",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "average_tokens_across_devices",
    "data_seed",
    "dataloader_drop_last",
    "dataloader_num_workers",
    "dataloader_persistent_workers",
    "dataloader_pin_memory",
    "dataloader_prefetch_factor",
    "dataset_num_proc",
    "ddp_bucket_cap_mb",
    "ddp_find_unused_parameters",
    "disable_dropout",
    "discopop_tau",
    "eval_steps",
    "f_alpha_divergence_coef",
    "f_divergence_type",
    "full_determinism",
    "gradient_checkpointing_kwargs",
    "label_smoothing",
    "ld_alpha",
    "logging_first_step",
    "lr_scheduler_kwargs",
    "lr_scheduler_type",
    "max_grad_norm",
    "neftune_noise_alpha",
    "optim",
    "optim_args",
    "pad_to_multiple_of",
    "padding_free",
    "per_device_eval_batch_size",
    "precompute_ref_batch_size",
    "ref_model_mixup_alpha",
    "ref_model_sync_steps",
    "router_aux_loss_coef",
    "save_total_limit",
    "sync_ref_model",
    "tf32",
    "torch_compile",
    "torch_compile_mode",
    "torch_empty_cache_steps",
    "truncation_mode",
    "use_liger_kernel",
    "use_weighting",
    "warmup_steps",
    "weight_decay",
)

# Fields that TRL 1.x removed: say so instead of a bare "unknown field".
REMOVED_FIELDS = {
    "maxPromptLength": "removed in TRL 1.x: prompts are no longer truncated separately; "
    "set spec.dpo.maxLength for the whole sequence",
    "rpoAlpha": "removed in TRL 1.x: for RPO set lossType: [sigmoid, sft] with "
    "lossWeights: [1.0, <alpha>]",
    "tcpxoDaemonImage": "removed: the TCPXO daemon runs with NET_ADMIN and host paths, so the "
    "cluster admin pins its image in the operator's settings (chart value "
    "network.tcpxo.daemonImage); delete the field",
    "fsdpVersion": "removed: fsdp and hsdp always run FSDP2 (FSDP1 is deprecated in PyTorch and "
    "cannot run off a GPU, so it could not be tested); delete the field",
}


# Validation context keys: skip the cross-field rules (and the plan), or the memory plan alone.
WITHOUT_RULES = "withoutRules"
WITHOUT_MEMORY_PLAN = "withoutMemoryPlan"


@dataclass(frozen=True)
class Rule:
    """A cross-field rule, written once, in CEL.

    The CRD carries it (`x-kubernetes-validations`), so the API server refuses a manifest that
    breaks it; the model it belongs to evaluates the same expression with cel-python, so `dpo
    validate`, `dpo run` and the operator refuse the same manifests with the same message.
    `quoting` is an optional CEL string expression (the API server's messageExpression) that
    says `message` with the values at fault; the API server estimates its cost, so it only quotes
    fields of bounded size. A transition rule compares with the stored object (`oldSelf`): only
    the API server, which has it, can check it.
    """

    rule: str
    message: str
    field_path: str = ""
    quoting: str | None = None
    transition: bool = False

    def validation(self) -> dict[str, str]:
        """The rule as the CRD writes it."""
        entry = {"rule": self.rule, "message": self.message}
        if self.quoting:
            entry["messageExpression"] = self.quoting
        if self.field_path:
            entry["fieldPath"] = self.field_path
        return entry

    def check(self, activation: dict[str, Any]) -> str | None:
        """The message when the rule does not hold for `activation` (the document as CEL
        values, `self`), else None."""
        if _program(self.rule).evaluate(activation):
            return None
        message = str(_program(self.quoting).evaluate(activation)) if self.quoting else self.message
        return f"{self.field_path.lstrip('.')}: {message}" if self.field_path else message


def _join(items: Any, separator: Any = "") -> Any:
    """Kubernetes' CEL `join` (its strings extension), which cel-python lacks."""
    return celtypes.StringType(str(separator).join(str(item) for item in items))


@functools.cache
def _program(expression: str) -> Any:
    environment = celpy.Environment()
    return environment.program(environment.compile(expression), functions={"join": _join})


class RuledModel(ContractModel):
    """A model with cross-field rules: each is a `Rule`, checked here and by the API server."""

    rules: ClassVar[tuple[Rule, ...]] = ()

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler(core_schema)
        if cls.rules:
            target = handler.resolve_ref_schema(schema)
            target["x-kubernetes-validations"] = [rule.validation() for rule in cls.rules]
        return schema

    @model_validator(mode="after")
    def _rules_hold(self, info: ValidationInfo) -> Self:
        checked = [rule for rule in type(self).rules if not rule.transition]
        if not checked or (info.context or {}).get(WITHOUT_RULES):
            return self
        document = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        activation = {"self": json_to_cel(document)}
        problems = [p for rule in checked if (p := rule.check(activation)) is not None]
        if problems:
            # One line per problem, each led by its path below this model: see describe_errors.
            raise ValueError("\n".join(problems))
        return self


# Kubernetes' ObjectMeta: the fields the API server sets or keeps besides those read here.
OBJECT_META_FIELDS = frozenset(
    {
        "name",
        "generateName",
        "namespace",
        "selfLink",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "labels",
        "annotations",
        "ownerReferences",
        "finalizers",
        "managedFields",
    }
)


class ObjectMeta(BaseModel):
    """The part of metadata the operator reads; the rest of Kubernetes' ObjectMeta (what the API
    server adds) is ignored, and any other field refused, as the API server refuses it."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _only_object_meta(cls, document: Any) -> Any:
        if isinstance(document, dict):
            unknown = sorted(str(key) for key in document if key not in OBJECT_META_FIELDS)
            if unknown:
                raise ValueError(
                    f"unknown field {', '.join(unknown)}: not a field of Kubernetes' ObjectMeta; "
                    "remove it (labels or annotations hold free-form data)"
                )
        return document

    name: str  # checked by a DPOJob rule (metadata has no schema in a CRD)
    namespace: str = "default"
    uid: str | None = None
    generation: StrictInt | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# spec


class ModelSpec(ContractModel):
    """The policy to train and, optionally, a separate reference model."""

    name: UriStr = Field(
        description="Hub id (org/model), local path, storage URI, or builtin:tiny-<name> for a "
        "tiny model built locally (tests, quickstart)."
    )
    revision: ShortStr | None = Field(
        default=None, description="Hub branch, tag or commit; pin it for reproducible runs."
    )
    reference: ModelRef | None = Field(
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


class DPOSpec(RuledModel):
    """DPO hyper-parameters (TRL DPOConfig; CPOConfig for simpo)."""

    rules = (
        Rule(
            "!has(self.lossType) || !('simpo' in self.lossType) || size(self.lossType) == 1",
            "simpo is reference-free and runs through TRL's CPO trainer: it cannot be combined "
            "with other loss types",
            ".lossType",
            quoting="'simpo is reference-free and runs through TRL\\'s CPO trainer: it cannot be "
            "combined with other loss types, got ' + self.lossType.join(', ')",
        ),
        Rule(
            "!has(self.lossWeights) || !has(self.lossType) || "
            "size(self.lossWeights) == size(self.lossType)",
            "needs as many entries as lossType: give one weight per loss type",
            ".lossWeights",
        ),
        Rule(
            "!has(self.lossType) || !('simpo' in self.lossType) || "
            "!has(self.precomputeRefLogProbs) || !self.precomputeRefLogProbs",
            "simpo uses no reference model, so there are no reference log-probs to precompute",
            ".precomputeRefLogProbs",
        ),
    )

    beta: StrictFloat = Field(
        default=0.1,
        gt=0,
        le=100,
        description="Strength of the pull towards the reference: too low drifts and reward-hacks, "
        "too high learns nothing. 0.1 for sigmoid; 2.0 is typical for sigmoid_norm and simpo.",
    )
    loss_type: list[LossType] = Field(
        default=["sigmoid"],
        min_length=1,
        max_length=8,
        description="One loss, e.g. [sigmoid], or several summed with lossWeights, e.g. "
        "[sigmoid, sft] for RPO. sigmoid_norm is length-normalised DPO; simpo is reference-free "
        "SimPO (TRL's CPO trainer) and must stand alone.",
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
    max_length: StrictInt = Field(
        default=1024, ge=8, le=1048576, description="Maximum tokens of prompt + response."
    )
    precompute_ref_log_probs: bool = Field(
        default=False,
        description="Compute the reference log-probs once before training and free the "
        "reference: saves memory and time per step when the reference is a separate model.",
    )
    seed: StrictInt = Field(default=42, ge=0, description="Random seed for data order and init.")
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
            named = ", ".join(_printable(key) for key in refused)
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
    gpu_memory: Quantity | None = Field(
        default=None,
        description="Memory of one GPU, e.g. 80Gi, for the memory plan. Default: read from a GPU "
        "product label in scheduling.nodeSelector (nvidia.com/gpu.product, "
        "cloud.google.com/gke-accelerator, node.kubernetes.io/instance-type).",
    )

    @field_validator("cpu", "memory", "shm_size", "gpu_memory")
    @classmethod
    def _quantity(cls, value: str | int | None) -> str | None:
        return None if value is None else _check_quantity(value)


Strategy = Literal["auto", "ddp", "fsdp", "hsdp"]


class ParallelismSpec(ContractModel):
    """How the model is spread over GPUs."""

    strategy: Strategy = Field(
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
    rdma_devices: StrictInt = Field(
        default=1,
        ge=1,
        le=64,
        description="RDMA devices per pod (efa: the instance's EFA count, e.g. 32 on p5).",
    )
    secondary_networks: list[K8sName] = Field(
        default_factory=list,
        max_length=16,
        description="roce: Multus NetworkAttachmentDefinitions; tcpxo: the GKE networks of the "
        "8 GPU NICs, in NIC order.",
    )
    collective_timeout_seconds: StrictInt = Field(
        default=1800,
        ge=60,
        le=86400,
        description="A collective that hangs longer aborts the run so it can be restarted "
        "(the Trainer's ddp_timeout; NCCL itself has no timeout variable).",
    )


class PodResources(ContractModel):
    """Resources of a single-pod Job; unset values follow spec.resources."""

    gpus: StrictInt | None = Field(
        default=None, ge=0, le=16, description="GPUs (default: 1 if training uses GPUs)."
    )
    cpu: Quantity | None = Field(default=None, description="CPU request.")
    memory: Quantity | None = Field(default=None, description="Memory request and limit.")

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, value: str | int | None) -> str | None:
        return None if value is None else _check_quantity(value)


class EvalGateSpec(RuledModel):
    """The held-out gate: an adapter is promoted only if every set threshold holds; a threshold
    set to null is not checked."""

    rules = (
        Rule(
            # has(): the API server also checks the group's default, {}, against its rules.
            "!has(self.enabled) || !self.enabled || self.mustBeatPromoted || "
            + " || ".join(
                # A null threshold (nullable in the CRD) is a null_type, not a double.
                f"(has(self.{name}) && type(self.{name}) == double)"
                for name in ("minRewardAccuracy", "minRewardMargin", "maxAnchorNllIncrease")
            ),
            "every criterion is off (null), so the gate would pass anything; set one of "
            "minRewardAccuracy, minRewardMargin, maxAnchorNllIncrease or mustBeatPromoted",
        ),
    )

    enabled: bool = Field(default=True, description="Run the gate after training.")
    data: DataSourceSpec | None = Field(
        default=None, description="Held-out pairs for the gate (default: spec.data.eval)."
    )
    anchor_data: DataSourceSpec | None = Field(
        default=None,
        description="Texts for the drift check (default: the held-out chosen responses).",
    )
    max_samples: StrictInt | None = Field(
        default=None, ge=1, description="Evaluate at most this many pairs."
    )
    min_reward_accuracy: StrictFloat | None = Field(
        default=0.6, ge=0, le=1, description="Fraction of held-out pairs ranked correctly."
    )
    min_reward_margin: StrictFloat | None = Field(
        default=0.0, description="Mean implicit reward margin (chosen - rejected)."
    )
    max_anchor_nll_increase: StrictFloat | None = Field(
        default=0.2,
        ge=0,
        description="Largest allowed relative rise of per-token NLL on the anchor set versus the "
        "reference (0.2 = 20%): catches drift and reward hacking.",
    )
    must_beat_promoted: bool = Field(
        default=False, description="Also require beating the currently promoted adapter."
    )
    beat_margin: StrictFloat = Field(
        default=0.0, ge=0, description="Reward accuracy the new adapter must add over it."
    )
    confidence: StrictFloat = Field(
        default=0.95,
        gt=0.5,
        lt=1,
        description="Each criterion must hold for its whole interval at this confidence; an "
        "estimate that holds on too few pairs to be sure is Inconclusive (not promoted).",
    )
    resources: PodResources = Field(default_factory=PodResources)


# '.' and '..' path segments: a path that climbs out of the claim or prefix it names.
_TRAVERSAL = "/[.][.]?(/|$)"


def _no_traversal(field: str) -> Rule:
    return Rule(
        f"!self.{field}.matches('{_TRAVERSAL}')",
        "may not contain '.' or '..' path segments: name the path inside the claim or bucket "
        "directly",
        f".{field}",
    )


class PromotionSpec(RuledModel):
    """Where a gated adapter is published."""

    rules = (
        _no_traversal("target"),
        Rule(
            "!self.plainHttp || self.target.startsWith('oci://')",
            "talks to an OCI registry without TLS; only an oci:// target has one: remove it",
            ".plainHttp",
        ),
    )

    target: PromotionTarget = Field(
        description="Adapters land in <target>/versions/<version>/ and <target>/current points at "
        "the newest. oci://<registry>/<repository>: pushed as an OCI artifact tagged with its "
        "version and moved to the tag current, the gate report attached as a referrer."
    )
    mode: Literal["auto", "manual"] = Field(
        default="auto",
        description='manual waits for the annotation dpo.dev/approve: "true" after the gate.',
    )
    served_model_name: Annotated[str, Field(min_length=1, max_length=256)] | None = Field(
        default=None,
        description="The base model's name where the adapter is served (vLLM's model or "
        "--served-model-name), written to the adapter's adapter_config.json as "
        "base_model_name_or_path. Default: model.name.",
    )

    plain_http: bool = Field(
        default=False,
        description="oci:// only: HTTP instead of HTTPS, for a registry inside the cluster "
        "without TLS. Credentials: OCI_USERNAME and OCI_PASSWORD in output.credentialsSecret.",
    )

    @field_validator("target", mode="before")
    @classmethod
    def _explain_target(cls, value: object) -> object:
        return _explain_uri(value, PROMOTION_TARGET_PATTERN, "promotion target")


class OutputSpec(RuledModel):
    """Where checkpoints, adapters and reports go."""

    rules = (_no_traversal("uri"),)

    uri: StorageUri = Field(
        description="pvc://<claim>/<path> or an object store URI; artifacts go to "
        "<uri>/<namespace>/<name>/<uid>/."
    )
    credentials_secret: K8sName | None = Field(
        default=None,
        description="Secret whose keys become env vars of every pod (e.g. AWS_ACCESS_KEY_ID).",
    )

    @field_validator("uri", mode="before")
    @classmethod
    def _explain_uri(cls, value: object) -> object:
        return _explain_uri(value, STORAGE_URI_PATTERN, "storage URI")


def _explain_uri(value: object, pattern: str, what: str) -> object:
    if isinstance(value, str) and not re.match(pattern, value):
        raise ValueError(f"{value!r} is not a {what}: {PATTERN_HINTS[pattern]}")
    return value


class Toleration(ContractModel):
    key: Annotated[str, Field(max_length=317)] | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: Annotated[str, Field(max_length=63)] | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: StrictInt | None = None


class SchedulingSpec(ContractModel):
    """Where and when pods run."""

    queue_name: K8sName | None = Field(
        default=None,
        description="Kueue LocalQueue: Jobs are created suspended and admitted by Kueue.",
    )
    priority_class_name: K8sName | None = Field(default=None, description="Pod PriorityClass.")
    node_selector: LabelMap = Field(default_factory=dict, description="Pod nodeSelector.")
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Pod tolerations."
    )
    affinity: dict[str, Any] = Field(
        default_factory=dict,
        description="Pod affinity, as in a Pod spec.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    topology_key: QualifiedName | None = Field(
        default=None,
        description="Node label grouping well-connected machines (e.g. a rack or block label): "
        "pods are packed into one such group (Kueue topology-aware scheduling when queued; "
        "for hsdp, each shard group is also required inside one).",
    )
    topology_policy: Literal["Preferred", "Required"] = Field(
        default="Preferred",
        description="Preferred: pack into one topologyKey group where possible; Required: "
        "wait until one group has room for every pod.",
    )


class RunPolicySpec(ContractModel):
    """Restarts, deadlines and clean-up."""

    max_restarts: StrictInt = Field(
        default=3,
        ge=0,
        le=MAX_RESTARTS,
        description="Times the pod group is restarted from its checkpoint after a failure "
        "(pod disruptions such as preemption are not counted).",
    )
    active_deadline_seconds: StrictInt | None = Field(
        default=None,
        ge=1,
        description="Fail when running longer (time suspended or awaiting approval not counted).",
    )
    startup_timeout_seconds: StrictInt = Field(
        default=1800,
        ge=30,
        le=7 * 86400,
        description="Fail when a Job's pods have not all started this long after it was created "
        "(image pull errors, missing Secrets or PVCs, no room for the whole group): the "
        "DPOJob's Stalled condition says why meanwhile. Queued and suspended time not counted.",
    )
    ttl_seconds_after_finished: StrictInt | None = Field(
        default=None,
        ge=0,
        description="Delete finished child Jobs and pods after this long; the DPOJob and the "
        "artifacts stay.",
    )
    suspend: bool = Field(
        default=False, description="Stop the pods, keep checkpoints; false resumes."
    )


class MonitoringSpec(RuledModel):
    """Live training metrics."""

    rules = (
        Rule(
            f"!has(self.port) || self.port != {DEFAULT_MASTER_PORT}",
            f"{DEFAULT_MASTER_PORT} is the rendezvous port (MASTER_PORT) of the training pods; "
            f"choose another, e.g. the default {DEFAULT_METRICS_PORT}",
            ".port",
        ),
    )

    port: StrictInt = Field(
        default=DEFAULT_METRICS_PORT,
        ge=1024,
        le=65535,
        description="Rank 0's Prometheus /metrics port.",
    )
    interval_seconds: StrictInt = Field(
        default=30, ge=5, le=3600, description="How often the operator copies metrics to status."
    )


class HealthSpec(ContractModel):
    """What the trainer does when a DPO health signal is raised while it trains: reward accuracy
    at chance after warm-up, margins collapsing, chosen rewards falling while margins rise
    (likelihood displacement), a NaN or infinite loss, an exploding gradient norm."""

    action: HealthAction = Field(
        default="warn",
        description="warn: a Degraded condition, an Event and dpo_train_degraded; training goes "
        "on. stop: the same, and training ends at once with the last checkpoint saved before "
        "the signal as the adapter (the gate still decides).",
    )
    warmup_steps: StrictInt | None = Field(
        default=None,
        ge=0,
        le=10_000_000,
        description="Steps before accuracy and margins are judged (default: a tenth of the run).",
    )


class EnvVar(ContractModel):
    name: EnvName
    value: Annotated[str, Field(max_length=32768)]


class SecretKeySelector(ContractModel):
    name: K8sName
    key: Annotated[str, Field(min_length=1, max_length=253)]


class SecretEnvVar(ContractModel):
    """An env var read from a Secret key (e.g. HF_TOKEN); values never appear in the spec."""

    name: EnvName
    secret_key_ref: SecretKeySelector


_IMMUTABLE_AFTER_START = (
    "model",
    "data",
    "dpo",
    "peft",
    "resources",
    "parallelism",
    "network",
    "output",
)

_RESERVED_ENV_LIST = "[" + ", ".join(f"'{name}'" for name in RESERVED_ENV) + "]"
# What vLLM serves of a LoRA adapter (vllm.config.LoRAConfig): --max-lora-rank takes one of
# these ranks, and LoRA applies to linear projection layers; adapters of embeddings or the LM
# head are refused when loaded.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
VLLM_MAX_LORA_RANK = VLLM_LORA_RANKS[-1]
VLLM_UNSERVED_MODULES = ("lm_head", "embed_tokens", "wte", "wpe", "embed_in", "embed_out")
_VLLM_UNSERVED_LIST = "[" + ", ".join(f"'{m}'" for m in VLLM_UNSERVED_MODULES) + "]"
# The rules on what vLLM serves hold for a promoted LoRA adapter only.
_PROMOTED_LORA = "has(self.promotion) && !(has(self.peft.enabled) && !self.peft.enabled)"


class DPOJobSpec(RuledModel):
    """What to train, on what, on how many machines, and where it goes."""

    rules = (
        Rule(
            "self.scheduling.topologyPolicy != 'Required' || has(self.scheduling.topologyKey)",
            "requires the pods inside one topology group, which scheduling.topologyKey names: "
            "set it, or use Preferred",
            ".scheduling.topologyPolicy",
        ),
        Rule(
            "self.parallelism.strategy != 'hsdp' || self.resources.nodes > 1",
            "hsdp replicates across nodes and needs resources.nodes > 1; use fsdp on one node",
            ".parallelism.strategy",
        ),
        Rule(
            "self.parallelism.strategy != 'hsdp' || self.resources.gpusPerNode > 1",
            "hsdp shards inside a node and needs resources.gpusPerNode >= 2; use ddp otherwise",
            ".parallelism.strategy",
        ),
        Rule(
            "!(self.parallelism.strategy in ['fsdp', 'hsdp']) || self.resources.gpusPerNode > 0",
            "fsdp and hsdp shard over GPUs but resources.gpusPerNode is 0; set it >= 1 or use "
            "ddp on CPU",
            ".parallelism.strategy",
            quoting="self.parallelism.strategy + ' shards over GPUs but resources.gpusPerNode is "
            "0; set it >= 1 or use ddp on CPU'",
        ),
        Rule(
            "self.network.profile == 'tcp' || self.resources.gpusPerNode > 0",
            "RDMA network profiles move GPU memory but resources.gpusPerNode is 0; set it >= 1 "
            "or use tcp",
            ".network.profile",
            quoting="self.network.profile + ' moves GPU memory over RDMA but "
            "resources.gpusPerNode is 0; set it >= 1 or use tcp'",
        ),
        Rule(
            "!has(self.promotion) || self.evalGate.enabled",
            "nothing is promoted without a gate; enable evalGate or remove promotion",
            ".promotion",
        ),
        Rule(
            f"!({_PROMOTED_LORA}) || !has(self.peft.r) || self.peft.r <= {VLLM_MAX_LORA_RANK}",
            f"a promoted adapter is served by vLLM, whose largest LoRA rank is "
            f"{VLLM_MAX_LORA_RANK}: lower peft.r",
            ".peft.r",
        ),
        Rule(
            f"!({_PROMOTED_LORA}) || !has(self.peft.targetModules) || "
            f"self.peft.targetModules.all(m, !(m in {_VLLM_UNSERVED_LIST}))",
            "a promoted adapter is served by vLLM, which applies LoRA to linear projection "
            "layers only: remove "
            + ", ".join(VLLM_UNSERVED_MODULES)
            + " from peft.targetModules (all-linear already leaves the head out)",
            ".peft.targetModules",
        ),
        Rule(
            "!self.evalGate.mustBeatPromoted || has(self.promotion)",
            "compares with the promoted adapter; set promotion.target",
            ".evalGate.mustBeatPromoted",
        ),
        Rule(
            "!self.evalGate.mustBeatPromoted || !has(self.promotion) || "
            "self.promotion.target.startsWith('pvc://') || "
            "self.promotion.target.startsWith('s3://')",
            "switches the promoted pointer only if it still names the adapter the gate beat, "
            "which needs a pvc:// target (a lock) or an s3:// one (a conditional write); use "
            "one, or drop mustBeatPromoted",
            ".evalGate.mustBeatPromoted",
        ),
        Rule(
            "!('simpo' in self.dpo.lossType) || !has(self.model.reference)",
            "simpo is reference-free; remove model.reference",
            ".model.reference",
        ),
        Rule(
            f"!has(self.env) || self.env.all(e, !(e.name in {_RESERVED_ENV_LIST}))",
            "may not set the pod contract's variables, which are set by the operator ("
            + ", ".join(RESERVED_ENV)
            + "); remove them",
            ".env",
        ),
        Rule(
            f"!has(self.secrets) || self.secrets.all(e, !(e.name in {_RESERVED_ENV_LIST}))",
            "may not set the pod contract's variables, which are set by the operator ("
            + ", ".join(RESERVED_ENV)
            + "); rename them",
            ".secrets",
        ),
    )

    model: ModelSpec
    data: DataSpec
    output: OutputSpec
    dpo: DPOSpec = Field(default_factory=DPOSpec)
    peft: PeftSpec = Field(default_factory=PeftSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec)
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    eval_gate: EvalGateSpec = Field(default_factory=EvalGateSpec)
    promotion: PromotionSpec | None = Field(
        default=None, description="Publish the adapter after the gate passes (optional)."
    )
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec)
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec)
    health: HealthSpec = Field(default_factory=HealthSpec)
    image: Annotated[str, Field(min_length=1, max_length=512)] | None = Field(
        default=None, description="Trainer image (default: the operator's matching release)."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="Pull policy of the trainer image."
    )
    env: list[EnvVar] = Field(
        default_factory=list, max_length=64, description="Extra env vars of every pod."
    )
    secrets: list[SecretEnvVar] = Field(
        default_factory=list,
        max_length=32,
        description="Env vars from Secret keys, e.g. HF_TOKEN (secretKeyRef only).",
    )

    @model_validator(mode="before")
    @classmethod
    def _finite_numbers(cls, document: Any) -> Any:
        """NaN and infinity pass every bound check (a comparison with NaN is false) and JSON
        cannot carry them: a YAML .nan would make a gate that can never pass."""
        found = sorted(_non_finite(document))
        if found:
            raise ValueError(
                "\n".join(f"{path}: must be a finite number, got {v}" for path, v in found)
            )
        return document

    @model_validator(mode="after")
    def _fits_in_memory(self, info: ValidationInfo) -> DPOJobSpec:
        """Memory arithmetic CEL cannot do: `dpo validate`, `dpo run` and the operator check it
        after every rule held (the planner, imported here, reads these models)."""
        if (info.context or {}).get(WITHOUT_MEMORY_PLAN) or (info.context or {}).get(WITHOUT_RULES):
            return self
        from dpo_operator.plan import plan

        problems = plan(self).problems
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def learning_rate(self) -> float:
        """The learning rate to train with: the user's, or the default for LoRA vs full FT."""
        if self.dpo.learning_rate is not None:
            return self.dpo.learning_rate
        return 1e-5 if self.peft.enabled else 1e-6


SPEC_DIGEST_ANNOTATION = "dpo.dev/spec-digest"


def spec_digest(spec: DPOJobSpec) -> str:
    """What a child was rendered from, in short: the spec, less runPolicy.suspend (which pauses
    a run and changes no child). A child carrying another digest predates an edit of the spec."""
    document = spec.model_dump(mode="json", by_alias=True, exclude={"run_policy": {"suspend"}})
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]


def _non_finite(node: Any, path: str = "") -> list[tuple[str, float]]:
    if isinstance(node, float) and not math.isfinite(node):
        return [(path or "(document)", node)]
    if isinstance(node, dict):
        return [f for k, v in node.items() for f in _non_finite(v, f"{path}.{k}".lstrip("."))]
    if isinstance(node, list):
        return [f for i, v in enumerate(node) for f in _non_finite(v, f"{path}.{i}")]
    return []


# ----------------------------------------------------------------------------------------------
# status

Phase = Literal[
    "Pending",
    "Queued",
    "Training",
    "Evaluating",
    "AwaitingApproval",
    "Promoting",
    "Succeeded",
    "Rejected",
    "Failed",
    "Suspended",
]
PHASES: tuple[str, ...] = get_args(Phase)
TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "Rejected", "Failed"})


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
    degraded: list[HealthReason] = Field(
        default_factory=list,
        max_length=8,
        description="The health signals that hold at the latest log (dpo_train_degraded).",
    )
    updated_at: datetime | None = None


class GateCriterion(ContractModel):
    name: Annotated[str, Field(max_length=128)]
    value: StrictFloat | None = None  # nothing to measure (mustBeatPromoted, nothing promoted yet)
    low: StrictFloat | None = None
    high: StrictFloat | None = None
    n: StrictInt | None = None
    method: Annotated[str, Field(max_length=32)] | None = None
    threshold: StrictFloat
    passed: bool
    inconclusive: bool = False
    needed_pairs: StrictInt | None = None


class HeldOutStatus(ContractModel):
    """The pairs the gate scored, when held out of the training data."""

    source: Annotated[str, Field(max_length=1024)]
    fraction: StrictFloat
    max_pairs: StrictInt
    pairs: StrictInt
    prompts: StrictInt


class EvaluationStatus(ContractModel):
    verdict: Literal["Passed", "Rejected", "Inconclusive"]
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
    metrics: TrainingMetrics | None = None
    evaluation: EvaluationStatus | None = None
    promotion: PromotionStatus | None = None


class DPOJob(RuledModel):
    """DPOJob runs Direct Preference Optimization fine-tuning, gates and promotes the result."""

    rules = (
        Rule(
            f"self.metadata.name.size() <= {MAX_NAME_LENGTH} && "
            f"self.metadata.name.matches('{NAME_PATTERN}')",
            f"metadata.name: must be at most {MAX_NAME_LENGTH} lowercase letters, digits and '-', "
            "starting with a letter (it names the pods' hostnames); rename the DPOJob",
        ),
        Rule(
            "!has(oldSelf.status) || !has(oldSelf.status.startTime) || ("
            + " && ".join(f"self.spec.{f} == oldSelf.spec.{f}" for f in _IMMUTABLE_AFTER_START)
            + ")",
            "spec."
            + ", spec.".join(_IMMUTABLE_AFTER_START)
            + " cannot change once training has started; create a new DPOJob instead",
            transition=True,
        ),
    )

    api_version: Literal["dpo.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["DPOJob"]
    metadata: ObjectMeta
    spec: DPOJobSpec
    status: DPOJobStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace


# ----------------------------------------------------------------------------------------------
# errors users can act on


def parse_dpojob(
    manifest: object, *, check_memory: bool = True, check_rules: bool = True
) -> DPOJob:
    """Validate a manifest (a dict from YAML/JSON or the API server) into a DPOJob.

    `check_memory=False` skips the memory plan (`dpo plan` shows a job that fits nowhere);
    `check_rules=False` skips the rules and the plan, for a spec already found valid (the
    operator checks each generation once).
    """
    context = {WITHOUT_MEMORY_PLAN: not check_memory, WITHOUT_RULES: not check_rules}
    return DPOJob.model_validate(manifest, context=context)


def describe_errors(error: ValidationError) -> list[str]:
    """One line per problem: the field path, what was wrong and what to do."""
    return [line for detail in error.errors() for line in _describe(detail)]


_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}
_TYPE_NAMES = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "a whole number",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list, e.g. [a, b]",
    "dict_type": "a mapping",
    "model_type": "a mapping of fields",
    "model_attributes_type": "a mapping of fields",
}


def _printable(name: str) -> str:
    """A field name as an error line can show it: odd ones (spaces, control characters, an
    empty name) quoted and escaped, so that one problem stays one line."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def _describe(detail: ErrorDetails) -> list[str]:
    loc = [str(part) for part in detail["loc"]]
    path = ".".join(_printable(part) for part in loc) or "(document)"
    kind = detail["type"]
    value = detail.get("input")
    context = detail.get("ctx", {})
    if kind == "extra_forbidden":
        field = loc[-1]
        if field in REMOVED_FIELDS:
            return [f"{path}: {REMOVED_FIELDS[field]}"]
        allowed = _allowed_fields(loc[:-1])
        hint = difflib.get_close_matches(field, allowed, n=1)
        suggestion = f"did you mean {hint[0]}? " if hint else ""
        return [f"{path}: unknown field; {suggestion}allowed here: {', '.join(sorted(allowed))}"]
    if kind == "missing":
        return [f"{path}: required field is missing; add it (see examples/ for a full DPOJob)"]
    if kind == "string_pattern_mismatch":
        pattern = str(context.get("pattern", ""))
        expected = PATTERN_HINTS.get(pattern, f"match {pattern}")
        return [f"{path}: {_short(value)} is not valid here; write {expected}"]
    if kind in _BOUNDS:
        key, symbol = _BOUNDS[kind]
        return [f"{path}: must be {symbol} {context.get(key)}, got {_short(value)}{_about(loc)}"]
    if kind in _TYPE_NAMES:
        return [f"{path}: must be {_TYPE_NAMES[kind]}, got {_short(value)}{_about(loc)}"]
    message = detail["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        # Cross-field rules report several problems, one per line, each led by its own path.
        return [_at(loc, line) for line in message.split("\n")]
    return [f"{path}: {message}, got {_short(value)}"]


def _at(loc: list[str], line: str) -> str:
    """A rule's problem line, under the path of the model that reported it."""
    path = ".".join(_printable(part) for part in loc)
    if not re.match(r"^[a-zA-Z.]+: ", line):
        return f"{path or '(document)'}: {line}"
    return f"{path}.{line}" if path else line


PATTERN_HINTS = {
    NAME_PATTERN: "lowercase letters, digits and '-', starting with a letter",
    K8S_NAME_PATTERN: "a Kubernetes object name: lowercase letters, digits, '-' and '.'",
    QUALIFIED_NAME_PATTERN: "a resource name or label key such as nvidia.com/gpu",
    ENV_NAME_PATTERN: "an environment variable name such as HF_TOKEN",
    QUANTITY_PATTERN: "a Kubernetes quantity such as 8, 500m or 64Gi",
    PARAMETER_COUNT_PATTERN: "a parameter count such as 70B, 8.03B or 500M",
    STORAGE_URI_PATTERN: _STORAGE_URI_HINT,
    PROMOTION_TARGET_PATTERN: _PROMOTION_TARGET_HINT,
}


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    """The model class at `loc` inside a DPOJob (list indexes skipped), if any."""
    model: type[BaseModel] = DPOJob
    for part in loc:
        if part.isdigit():
            continue
        field = _field(model, part)
        nested = _model_type(field.annotation) if field else None
        if nested is None:
            return None
        model = nested
    return model


def _field(model: type[BaseModel], name: str) -> FieldInfo | None:
    return next((f for key, f in model.model_fields.items() if name in (key, f.alias)), None)


def _allowed_fields(loc: list[str]) -> list[str]:
    """The field names (aliases) allowed at `loc`, for suggestions."""
    model = _model_at(loc)
    if model is None:
        return []
    return [f.alias or name for name, f in model.model_fields.items()]


def _about(loc: list[str]) -> str:
    """The field's own description, as a reminder of what it is for."""
    names = [part for part in loc if not part.isdigit()]
    model = _model_at(names[:-1]) if names else None
    field = _field(model, names[-1]) if model else None
    return f" ({field.description.rstrip('.')})" if field and field.description else ""


def _model_type(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_type(arg)
        if found is not None:
            return found
    return None
