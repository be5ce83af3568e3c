"""Per-rank memory runs: what each rank of a sharded run held and read, phase by phase, read from
train.json, with the figures the memory tier asserts and `tools/bench_memory.py` prints.

A run trains `builtin:medium-llama` (~113M parameters: 453 MB in fp32, well above a process's
own few hundred MB) for two optimizer steps (the second one's backward pass runs while the
optimizer's states are held: the steady state the plan describes) with short sequences, no
evaluation and no checkpoint (the checkpoint's I/O is not what is measured).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_contract.presets import MODEL_PRESETS
from dpo_contract.reports import RankMemory, TrainingReport
from dpo_operator.api import DPOJob
from dpo_operator.core.plan import Layout, estimate, model_shape

from tests.conftest import job_with
from tests.distributed.conftest import PodLayout, Run, launch
from tests.trainer.conftest import TINY_SPEC

MEDIUM = "medium-llama"
FP32 = 4


def memory_job(
    layout: PodLayout,
    *,
    lora: bool,
    accumulation: int,
    model: str = MEDIUM,
    steps: int = 2,
    save_steps: int = 1000,
) -> DPOJob:
    """Full fine-tunes load a separate reference (`model.reference`): both models are sharded
    and the reference log-probs are precomputed with it; LoRA precomputes with its adapter
    disabled."""
    builtin = f"builtin:{model}"
    models = {"name": builtin} if lora else {"name": builtin, "reference": {"name": builtin}}
    return job_with(
        **{
            **TINY_SPEC,
            "model": models,
            "data": {"train": {"uri": "builtin:synthetic-preferences/train?n=32"}},
            # No gate, so nothing is held out and nothing evaluated.
            "evalGate": {"enabled": False},
            "resources": {"nodes": layout.nodes, "gpusPerNode": layout.gpus_per_node},
            "parallelism": {"strategy": "auto" if layout.strategy == "single" else layout.strategy},
            "peft": {"enabled": lora, "r": 8, "alpha": 16, "dropout": 0.0},
            "dpo": {
                "maxSteps": steps,
                "saveSteps": save_steps,
                "loggingSteps": 1,
                "perDeviceBatchSize": 1,
                "gradientAccumulationSteps": accumulation,
                "maxLength": 16,
                "learningRate": 1e-5,
                "precomputeRefLogProbs": True,
            },
        }
    )


def weights_bytes(model: str = MEDIUM) -> int:
    """One fp32 copy of the builtin model's weights (what its checkpoint holds)."""
    job = memory_job(PodLayout("single", 1, 0), lora=True, accumulation=1, model=model)
    shape = model_shape(job.spec)
    assert shape is not None
    return FP32 * shape.parameters


def layer_bytes(model: str = MEDIUM) -> int:
    """One decoder layer in fp32."""
    preset = MODEL_PRESETS[model]
    h, i = preset["hidden_size"], preset["intermediate_size"]
    kv = h * preset["num_key_value_heads"] // preset["num_attention_heads"]
    return int(FP32 * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h))


@dataclass(frozen=True)
class Measured:
    """One finished memory run: its layout, its job and what every rank recorded."""

    name: str
    layout: PodLayout
    job: DPOJob
    report: TrainingReport

    @property
    def ranks(self) -> list[RankMemory]:
        return self.report.memory_by_rank

    def growth(self, rank: RankMemory, phase: str) -> int:
        """What a rank added during `phase`, over what it held when the phase began."""
        recorded = rank.phases[phase]
        return recorded.peak_bytes - recorded.start_bytes

    def held(self, rank: RankMemory, phase: str) -> int:
        """The most a rank held during `phase` beyond the process itself (what it held before
        loading anything)."""
        return rank.phases[phase].peak_bytes - rank.phases["load"].start_bytes

    def node_load_growth(self) -> int:
        """What every rank of pod 0 added while loading: the node's growth at load."""
        return sum(self.growth(r, "load") for r in self.ranks if r.node == 0)

    def planned_per_rank(self) -> int:
        """The plan's bytes per rank for this run (fp32 on CPU), without the GPU runtime part."""
        shape = model_shape(self.job.spec)
        assert shape is not None
        shard = {"single": 1, "fsdp": self.layout.world_size, "hsdp": self.layout.gpus_per_node}
        strategy: Any = self.layout.strategy
        parts = estimate(
            self.job.spec, shape, Layout(strategy, shard[strategy]), 0, device="cpu"
        ).parts
        return sum(v for k, v in parts.items() if k != "runtime")


def run_measured(name: str, layout: PodLayout, job: DPOJob, workdir: Path) -> Measured:
    run: Run = launch(job, workdir)
    run.assert_succeeded()
    report = TrainingReport.model_validate(run.summary())
    assert [r.rank for r in report.memory_by_rank] == list(range(layout.world_size))
    return Measured(name, layout, job, report)


@dataclass(frozen=True)
class Figures:
    """The memory tier's ratios (the bench's last line)."""

    world: int
    load_node_over_copy: float
    ref_rank_over_shard: float
    ga4_over_ga1: float
    export_rank0_over_median: float
    plan_error: float

    def line(self) -> str:
        return (
            f"memory bench: world={self.world} "
            f"load_node_over_copy={self.load_node_over_copy:.2f} "
            f"ref_rank_over_shard={self.ref_rank_over_shard:.2f} "
            f"ga4_over_ga1={self.ga4_over_ga1:.2f} "
            f"export_rank0_over_median={self.export_rank0_over_median:.2f} "
            f"plan_error={self.plan_error:.2f}"
        )


def figures(full_ga4: Measured, full_ga1: Measured, model: str = MEDIUM) -> Figures:
    """- load_node_over_copy: the node's growth at load over the models it loads (policy and
      reference, one fp32 copy each): 1 when the node reads each model once, N when every
      rank reads all of it.
    - ref_rank_over_shard: a rank's peak during the reference precompute over what it held of
      both models (its shards) plus two gathered layers (a forward's: the layer and its
      all-gather buffer): 1 when a forward gathers layer by
      layer; a whole-model gather adds N shards.
    - ga4_over_ga1: a rank's peak while training with accumulation 4 over accumulation 1.
    - export_rank0_over_median: rank 0's peak at export over the median of the other ranks'.
    - plan_error: |measured / planned - 1| of the training peak per rank against the plan."""
    world = full_ga4.layout.world_size
    copies = 2 * weights_bytes(model)
    rank0 = full_ga4.ranks[0]
    shards = copies // world + 2 * layer_bytes(model)
    others = [r.phases["export"].peak_bytes for r in full_ga4.ranks[1:]]
    trained = max(full_ga4.held(r, "train") for r in full_ga4.ranks)
    return Figures(
        world=world,
        load_node_over_copy=full_ga4.node_load_growth() / copies,
        ref_rank_over_shard=max(full_ga4.held(r, "reference") for r in full_ga4.ranks) / shards,
        ga4_over_ga1=trained / max(full_ga1.held(r, "train") for r in full_ga1.ranks),
        export_rank0_over_median=rank0.phases["export"].peak_bytes / statistics.median(others)
        if others
        else 1.0,
        plan_error=abs(trained / full_ga4.planned_per_rank() - 1),
    )


def table(runs: list[Measured]) -> str:
    """Per rank and phase: MiB held beyond the process itself, and MiB read at load."""
    phases = ("load", "reference", "train", "export")
    lines = ["run            rank  " + "".join(f"{p:>11}" for p in phases) + "    read MiB"]
    for run in runs:
        for rank in run.ranks:
            cells = "".join(
                f"{run.held(rank, p) / 2**20:>11.0f}" if p in rank.phases else f"{'-':>11}"
                for p in phases
            )
            lines.append(
                f"{run.name:<14} {rank.rank:>4}  {cells}    {rank.read_bytes / 2**20:8.0f}"
            )
    return "\n".join(lines)
