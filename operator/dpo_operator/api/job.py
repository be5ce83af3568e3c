"""The DPOJob: its spec (the groups and the rules that span them) and the resource itself.

The memory plan, arithmetic CEL cannot do, is checked by `dpo_operator.core.validate`.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from dpo_operator.api.cel import DEFAULT_OUTPUT, MEMORY_CHECK, WITHOUT_RULES, Rule, RuledModel
from dpo_operator.api.delivery import EvalGateSpec, OutputSpec, PromotionSpec
from dpo_operator.api.grammar import MAX_NAME_LENGTH, NAME_PATTERN, no_contract_env
from dpo_operator.api.limits import VLLM_MAX_LORA_RANK, VLLM_UNSERVED_MODULES
from dpo_operator.api.meta import ObjectMeta
from dpo_operator.api.scheduling import (
    EnvVar,
    HealthSpec,
    MonitoringSpec,
    RunPolicySpec,
    SchedulingSpec,
    SecretEnvVar,
)
from dpo_operator.api.status import DPOJobStatus
from dpo_operator.api.training import (
    DataSpec,
    DPOSpec,
    ModelSpec,
    NetworkSpec,
    ParallelismSpec,
    PeftSpec,
    ResourcesSpec,
)

_IMMUTABLE_AFTER_START = (
    "model",
    "data",
    "dpo",
    "peft",
    "parallelism",
    "network",
    "output",
)

# As PEFT matches a target_modules entry: the module's full name, or a suffix after a '.'.
_VLLM_UNSERVED_MATCH = "(^|[.])(" + "|".join(VLLM_UNSERVED_MODULES) + ")$"
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
            "!has(self.dpo.globalBatchSize) || self.dpo.globalBatchSize % "
            "(self.dpo.perDeviceBatchSize * self.resources.nodes * "
            "(self.resources.gpusPerNode > 0 ? self.resources.gpusPerNode : 1)) == 0",
            "must be a multiple of dpo.perDeviceBatchSize x the GPUs (resources.nodes x "
            "resources.gpusPerNode, 1 per pod on CPU): gradientAccumulationSteps is derived from "
            "it; change one of them",
            ".dpo.globalBatchSize",
        ),
        Rule(
            "!has(self.dpo.globalBatchSize) || !has(self.dpo.gradientAccumulationSteps) || "
            "self.dpo.gradientAccumulationSteps == 1",
            "is derived from dpo.globalBatchSize: set one of them",
            ".dpo.gradientAccumulationSteps",
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
            f"self.peft.targetModules.all(m, !m.matches('{_VLLM_UNSERVED_MATCH}'))",
            "a promoted adapter is served by vLLM, which applies LoRA to linear projection "
            "layers only: remove "
            + ", ".join(VLLM_UNSERVED_MODULES)
            + " (and any name ending in .<one of them>, which PEFT matches too) from "
            "peft.targetModules (all-linear already leaves the head out)",
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
            api_server=False,
        ),
        no_contract_env("env", "name", "remove them"),
        no_contract_env("secrets", "name", "rename them"),
    )

    model: ModelSpec
    data: DataSpec
    output: OutputSpec = Field(
        default=None,
        validate_default=True,
        description="Where checkpoints and the adapter go. Default: the installation's "
        "(chart value defaultOutput; `dpo run`: its work directory).",
    )
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

    @field_validator("output", mode="before")
    @classmethod
    def _installation_output(cls, value: Any, info: ValidationInfo) -> Any:
        """No output named: the installation's default, if it has one."""
        if value is not None:
            return value
        default = (info.context or {}).get(DEFAULT_OUTPUT)
        if default is None:
            raise ValueError(
                "missing, and this installation sets no default output (chart value "
                "defaultOutput.uri, `dpo operator --default-output`): set spec.output.uri to "
                "pvc://<claim>/<path> or an object store URI"
            )
        return default

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
        """Memory arithmetic CEL cannot do, checked after every rule held: the planner
        (`dpo_operator.core.plan`, which reads these models) comes in through the validation
        context from `core.validate`, so that this package imports nothing of the core."""
        context = info.context or {}
        check = context.get(MEMORY_CHECK)
        if check is None or context.get(WITHOUT_RULES):
            return self
        problems = check(self)
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
            + " && (has(self.spec.dpo.globalBatchSize) || "
            "self.spec.resources == oldSelf.spec.resources))",
            "spec."
            + ", spec.".join(_IMMUTABLE_AFTER_START)
            + " cannot change once training has started, nor spec.resources unless "
            "spec.dpo.globalBatchSize keeps each step's pairs at any size; create a new DPOJob "
            "instead",
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
