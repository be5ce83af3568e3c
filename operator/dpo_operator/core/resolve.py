"""A DPOJob resolved once: everything rendering derives from it (the installation's settings,
the memory plan and the layout it chose, the claims its URIs name, the process layout), built by
`resolve` and handed to every renderer, so that rendering the children of one reconcile plans
the job once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dpo_operator.api import DPOJob, DPOJobSpec, NetworkSpec
from dpo_operator.core.plan import (
    GIB,
    Layout,
    Plan,
    disk_quantity,
    gate_disk_bytes,
    grace_period_seconds,
    plan,
    save_seconds,
    status_shape,
    training_disk,
    transfer_timeout_seconds,
)
from dpo_operator.core.settings import DEFAULT_SETTINGS, Settings
from dpo_operator.core.storage import claims

FSDP_VERSION: Literal[2] = 2


@dataclass(frozen=True)
class ResolvedJob:
    job: DPOJob
    settings: Settings
    plan: Plan
    claims: tuple[str, ...]

    @property
    def spec(self) -> DPOJobSpec:
        return self.job.spec

    @property
    def layout(self) -> Layout:
        """The strategy and shard group the memory plan chose (`auto`: the cheapest that
        fits)."""
        chosen = self.plan.choice
        assert chosen is not None, "validation refuses a job that fits nowhere"
        return chosen

    @property
    def processes_per_node(self) -> int:
        """One process per GPU; one per pod on CPU."""
        return max(self.spec.resources.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.spec.resources.nodes * self.processes_per_node

    @property
    def gradient_accumulation_steps(self) -> int:
        """`dpo.gradientAccumulationSteps`, or what `dpo.globalBatchSize` makes of it at this
        size."""
        dpo = self.spec.dpo
        if dpo.global_batch_size is None:
            return dpo.gradient_accumulation_steps
        return dpo.global_batch_size // (dpo.per_device_batch_size * self.world_size)

    @property
    def on_cpu(self) -> bool:
        """Whether the processes run on CPUs: the job asks for no GPU, or the installation runs
        its layout on CPUs (`dpo run --cpu`, tests)."""
        return self.settings.cpu or self.spec.resources.gpus_per_node == 0

    @property
    def network(self) -> NetworkSpec:
        """The fabric the pods use: the spec's, or plain TCP on CPUs (no GPU NICs there)."""
        network = self.spec.network
        return network.model_copy(update={"profile": "tcp"}) if self.on_cpu else network

    @property
    def mixed_precision(self) -> Literal["bf16", "no"]:
        """bf16 on GPUs (the trainer falls back to fp32 where the GPU lacks it); fp32 on CPU."""
        return "no" if self.on_cpu else "bf16"

    @property
    def fsdp_version(self) -> Literal[2] | None:
        """The FSDP implementation that shards the job (always FSDP2), or None when nothing
        is."""
        return FSDP_VERSION if self.layout.strategy in ("fsdp", "hsdp") else None

    @property
    def training_disk(self) -> str:
        """Each training pod's local disk (`resources.ephemeralStorage`, or the plan's)."""
        return training_disk(self.spec, self.plan.shape, self.layout.strategy)

    @property
    def memory_request(self) -> str | None:
        """A training pod's memory (request and limit): `resources.memory`, or on GPUs what the
        plan says each pod holds while it loads the model, so that the scheduler (and Kueue)
        place what will really run. CPU pods take what they get unless told."""
        if self.spec.resources.memory is not None:
            return str(self.spec.resources.memory)
        if self.on_cpu or self.plan.host_memory is None:
            return None
        return f"{-(-self.plan.host_memory // GIB)}Gi"

    def disk_request(self, disk: str) -> str | None:
        """The `ephemeral-storage` a pod requests for `disk`. A Job queued in Kueue requests it
        only when `resources.ephemeralStorage` says so: Kueue admits nothing that asks for a
        resource its ClusterQueue does not cover, and most cover no disk (its /tmp is limited
        all the same)."""
        queued = self.spec.scheduling.queue_name is not None
        return None if queued and self.spec.resources.ephemeral_storage is None else disk

    @property
    def gate_disk(self) -> str:
        """The eval and promotion pods' local disk."""
        return disk_quantity(gate_disk_bytes(self.spec, self.plan.shape))

    @property
    def grace_period_seconds(self) -> int:
        """How long a training pod may take to stop (runPolicy, or the plan's save time)."""
        return grace_period_seconds(self.spec, self.plan.shape, self.layout.strategy)

    @property
    def save_seconds(self) -> int:
        """How long a training pod takes to save a checkpoint after SIGTERM."""
        return save_seconds(self.spec, self.plan.shape, self.layout.strategy)

    @property
    def saves_on_signal(self) -> bool:
        """Whether a checkpoint written on SIGTERM fits in the grace period."""
        return self.save_seconds <= self.grace_period_seconds

    @property
    def transfer_timeout_seconds(self) -> int:
        return transfer_timeout_seconds(self.spec, self.plan.shape, self.layout.strategy)


def resolve(job: DPOJob, settings: Settings = DEFAULT_SETTINGS) -> ResolvedJob:
    """The job planned with the model initializer's count once `status.model` has it."""
    counted = job.status.model if job.status else None
    shape = status_shape(counted) if counted else None
    return ResolvedJob(job, settings, plan(job.spec, shape=shape), tuple(claims(job)))
