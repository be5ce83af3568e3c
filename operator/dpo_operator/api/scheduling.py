"""The spec groups that say where, when and with what the pods run: scheduling, run policy,
monitoring, health, env and secrets.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from dpo_contract.config import HealthAction
from dpo_contract.fields import ContractModel
from dpo_contract.pod import DEFAULT_MASTER_PORT, DEFAULT_METRICS_PORT
from pydantic import Field, StrictFloat, StrictInt

from dpo_operator.api.cel import Rule, RuledModel
from dpo_operator.api.grammar import (
    LABEL_KEY_PATTERN,
    LABEL_VALUE_PATTERN,
    MAX_DURATION_SECONDS,
    MAX_RESTARTS,
    EnvName,
    K8sName,
    LabelMap,
    QualifiedName,
)


class Toleration(ContractModel):
    """A pod toleration; SchedulingSpec checks it as the API server would."""

    key: QualifiedName | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)] | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: StrictInt | None = Field(default=None, ge=0, le=MAX_DURATION_SECONDS)


class SchedulingSpec(RuledModel):
    """Where and when pods run."""

    rules = (
        Rule(
            # has(): the CRD's default ({}) is checked before its own defaults fill it.
            "!has(self.nodeSelector) || "
            f"self.nodeSelector.all(k, k.matches('{LABEL_KEY_PATTERN}') && "
            f"self.nodeSelector[k].matches('{LABEL_VALUE_PATTERN}') && "
            "size(self.nodeSelector[k]) <= 63)",
            "keys must be label keys (e.g. nvidia.com/gpu.product, a name of at most 63 "
            "characters) and values label values (at most 63 letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit)",
            ".nodeSelector",
        ),
        # Checked as the API server checks a pod's, before the Job exists.
        Rule(
            "!has(self.tolerations) || "
            "self.tolerations.all(t, has(t.key) || t.operator == 'Exists')",
            "a toleration without a key tolerates every taint and needs operator: Exists",
            ".tolerations",
        ),
        Rule(
            "!has(self.tolerations) || "
            "self.tolerations.all(t, t.operator != 'Exists' || !has(t.value) || t.value == '')",
            "operator Exists matches any value: remove the value",
            ".tolerations",
        ),
        Rule(
            "!has(self.tolerations) || self.tolerations.all(t, !has(t.tolerationSeconds) || "
            "(has(t.effect) && t.effect == 'NoExecute'))",
            "tolerationSeconds applies to effect NoExecute only (how long a pod stays after "
            "such a taint)",
            ".tolerations",
        ),
    )

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
    termination_grace_period_seconds: StrictInt | None = Field(
        default=None,
        ge=1,
        le=86400,
        description="How long a training pod may take to stop after SIGTERM (preemption, "
        "eviction). Default: from the plan, the time to write (and send) a checkpoint. When "
        "that does not fit (e.g. a spot notice of 120), the run stops without one and resumes "
        "from its last periodic checkpoint; an Event says so when it starts.",
    )
    active_deadline_seconds: StrictInt | None = Field(
        default=None,
        ge=1,
        le=MAX_DURATION_SECONDS,
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
        le=MAX_DURATION_SECONDS,
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
    straggler_factor: StrictFloat = Field(
        default=1.5,
        ge=1.1,
        le=100,
        description="Name a rank a Straggler (Degraded) when its compute probe is this many "
        "times the median of the other ranks' at 3 logging steps in a row.",
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
