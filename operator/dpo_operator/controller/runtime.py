"""What the operator's controllers share at run time, typed: kopf's memo carries one `Runtime`
(`memo.runtime`), made at startup from the settings `dpo operator` was started with."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import cast

import kopf

from dpo_operator.controller.cache import Key
from dpo_operator.controller.client import KubeAPI
from dpo_operator.controller.executor import KubernetesExecutor
from dpo_operator.controller.expectations import Expectations
from dpo_operator.controller.metrics import SweepSeries
from dpo_operator.controller.workqueue import WorkQueue
from dpo_operator.core.settings import Settings
from dpo_operator.core.sweep import Trial

# Reconciles at once, across DPOJobs (one DPOJob is never reconciled twice at once).
WORKERS = 16


@dataclass
class Runtime:
    executor: KubernetesExecutor
    queue: WorkQueue = field(default_factory=WorkQueue)
    # The phase of each DPOJob, for dpo_operator_dpojobs{phase}.
    phases: dict[Key, str] = field(default_factory=dict)
    # What decide read of each watched object (plural, namespace, name) at its last event, as a
    # hash: the projection itself is in the indexes already, and a hash is 28 bytes.
    seen: dict[tuple[str, str, str], int] = field(default_factory=dict)
    # DPOSweeps to reconcile (`dposweep`), apart from DPOJobs: a sweep may share a name with one.
    sweeps: WorkQueue = field(default_factory=WorkQueue)
    # The status each sweep was last written with, until the watch brings it back.
    sweep_statuses: Expectations = field(default_factory=Expectations)
    tasks_of_sweeps: list[asyncio.Task[None]] = field(default_factory=list)
    # The trials each sweep exported as dpo_operator_sweep_trial_info.
    sweep_series: dict[Key, list[SweepSeries]] = field(default_factory=dict)
    # Each sweep's trials, validated once per generation: key -> ((uid, generation), trials).
    sweep_trials: dict[Key, tuple[tuple[str, int], list[Trial]]] = field(default_factory=dict)
    # The workers and housekeeping, started with the first watch event (see `dpojob.on_change`).
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def start(cls, settings: Settings) -> Runtime:
        return cls(KubernetesExecutor(KubeAPI(connections=WORKERS), settings))


def runtime_of(memo: kopf.Memo) -> Runtime:
    """The runtime in kopf's memo (each object's memo is kopf's shallow copy of the operator's,
    so they all hold the same one)."""
    return cast(Runtime, memo.runtime)
