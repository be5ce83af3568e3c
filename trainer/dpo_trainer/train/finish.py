"""The end of a run: the whole adapter (or model) saved with its manifest, and train.json."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import gather_object
from dpo_contract.config import (
    DistributedRun,
    HealthSignal,
    HeldOutReport,
    StoppedEarly,
    TrainerConfig,
)
from dpo_contract.manifest import sha256_file, write_manifest
from dpo_contract.reports import (
    DataReport,
    FabricReport,
    RankCheckpoints,
    RankMemory,
    RankProbe,
    TrainedAdapter,
    TrainingReport,
)

from dpo_trainer.distributed import parameters_digest, peak_memory_bytes
from dpo_trainer.io.adapters import tensors_digest
from dpo_trainer.io.artifacts import (
    ADAPTER,
    TRAIN_REPORT,
    Artifacts,
    name_served_base_model,
    replace_directory,
)
from dpo_trainer.io.checkpoints import CheckpointTransfer
from dpo_trainer.io.models import torch_dtype
from dpo_trainer.train.memory import PhaseMemoryRecorder
from dpo_trainer.train.metrics import PrometheusCallback
from dpo_trainer.train.sharding import (
    adapter_state,
    export_full_model,
    mixed_precision,
    shards_the_model,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finish:
    """The end of one run: what the run learned along the way (its data, what really ran, the
    states each rank held, its health, where it stopped), gathered into the artifact and
    train.json by `write`."""

    config: TrainerConfig
    artifacts: Artifacts
    data: dict[str, DataReport | None]
    held_out: HeldOutReport | None
    ran: DistributedRun
    states: dict[str, int]
    health: list[HealthSignal]
    fabric: FabricReport | None
    compute_by_rank: list[RankProbe]
    stopped_early: StoppedEarly | None
    started: float
    memory: PhaseMemoryRecorder
    read_bytes: int
    transfer: CheckpointTransfer

    def write(
        self, trainer: Any, metrics: PrometheusCallback, final_eval: dict[str, float]
    ) -> TrainingReport:
        """Save the whole adapter (or model) with its manifest and write train.json.

        Every rank takes part: gathering sharded tensors is a collective, and a sharded full
        fine-tune is written by every rank, each its part. Rank 0 writes the rest and the
        manifest over every part; each pod uploads what it wrote.
        """
        config, artifacts, ran = self.config, self.artifacts, self.ran
        accelerator = trainer.accelerator
        staging = artifacts.root / f".{ADAPTER}.partial"
        if accelerator.is_local_main_process:
            shutil.rmtree(staging, ignore_errors=True)  # a part-written attempt before this one
        accelerator.wait_for_everyone()
        sharded = shards_the_model(config.distributed)
        dtype = torch_dtype(config.training.mixed_precision)
        with self.memory.phase("export"):
            parts, trained_adapter = self._save(trainer, staging, sharded, dtype)
        exported_as = dtype if sharded and config.lora is None else None
        memory_by_rank, checkpoints_by_rank = self._by_rank(trainer)
        seconds = time.monotonic() - self.started
        report = TrainingReport(
            job=config.job,
            step=trainer.state.global_step,
            world_size=ran.world_size,
            distributed=ran,
            # Rank 0's model and optimizer states (its shards) and peak: the memory plan's check.
            memory={**self.states, "peakBytes": peak_memory_bytes(ran.device)},
            memory_by_rank=memory_by_rank,
            checkpoints_by_rank=checkpoints_by_rank,
            mixed_precision=mixed_precision(dtype) if sharded else None,
            seconds=round(seconds, 3),
            gpu_hours=round(seconds * ran.world_size / 3600, 4) if ran.device == "cuda" else None,
            metrics=dict(metrics.latest),
            eval={k: v for k, v in final_eval.items() if isinstance(v, int | float)},
            data=self.data,
            held_out=self.held_out,
            adapter=f"{artifacts.uri.rstrip('/')}/{ADAPTER}",
            log_history=trainer.state.log_history,
            parameters_digest=_agreed_digest(trainer, exported_as),
            health=self.health,
            stopped_early=self.stopped_early,
            fabric_report=self.fabric,
            compute_by_rank=self.compute_by_rank,
            trained_adapter=trained_adapter,
            reference_log_probs=getattr(trainer, "reference_reports", []),
            settings=config,
        )
        if (
            parts
            and not artifacts.is_local
            and not accelerator.is_main_process
            and accelerator.is_local_main_process
        ):
            # Another pod's parts: into the store beside rank 0's (a shared volume has them).
            replace_directory(staging, artifacts.adapter)
            artifacts.upload(ADAPTER)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if config.lora is None:
                trainer.processing_class.save_pretrained(str(staging))
            elif config.promotion is not None:
                name_served_base_model(staging, config.promotion.served_model_name)
            report.adapter_digest = write_manifest(staging, elsewhere=parts)
            replace_directory(staging, artifacts.adapter)
            artifacts.upload(ADAPTER)
            artifacts.write_report(TRAIN_REPORT, report)
        accelerator.wait_for_everyone()
        # Left to interpreter exit, gloo's threads are torn down mid-flight and a rank may abort
        # (`terminate called without an active exception`, exit -6) after a finished run.
        if dist.is_initialized():
            dist.destroy_process_group()
        return report

    def _save(
        self, trainer: Any, staging: Path, sharded: bool, dtype: torch.dtype
    ) -> tuple[dict[str, str], TrainedAdapter | None]:
        """The whole adapter (LoRA) or model in the training dtype `dtype`, into `staging`. A
        sharded full fine-tune is written by every rank, each its part: returns the sha256 of
        each rank's part, for the manifest (the files of other pods are not on this disk), and
        on rank 0 of a LoRA run the adapter as trained, gathered whole."""
        lora = self.config.lora is not None
        main = trainer.accelerator.is_main_process
        if sharded and not lora:
            written = export_full_model(trainer.model, staging, dtype)
            return _gathered({written.name: sha256_file(written)}), None
        adapter = adapter_state(trainer.model) if sharded and lora else None
        if sharded and main:
            trainer.model.save_pretrained(str(staging), state_dict=adapter)
        elif not sharded:
            trainer.save_model(str(staging))
        if not (lora and main):
            return {}, None
        return {}, self._trained_adapter(trainer.accelerator.unwrap_model(trainer.model), adapter)

    def _trained_adapter(
        self, model: Any, gathered: dict[str, torch.Tensor] | None
    ) -> TrainedAdapter:
        """The adapter's tensors under the names PEFT saves them by, as this process holds
        them (`gathered` from every rank when sharded)."""
        from peft import get_peft_model_state_dict

        tensors = get_peft_model_state_dict(model, state_dict=gathered)
        return TrainedAdapter(
            tensors_digest=tensors_digest(tensors),
            tensors=len(tensors),
            base_model=self.config.model.name,
            revision=self.config.model.revision,
        )

    def _by_rank(self, trainer: Any) -> tuple[list[RankMemory], list[RankCheckpoints]]:
        """What every rank held and read, and what it sent and fetched of the checkpoints."""
        memory = RankMemory(
            rank=trainer.accelerator.process_index,
            node=trainer.accelerator.process_index // self.config.distributed.nproc_per_node,
            phases=self.memory.phases,
            read_bytes=self.read_bytes,
        )
        every = gather_object([(memory.model_dump_json(), self.transfer.counted.model_dump_json())])
        memories = sorted(
            (RankMemory.model_validate_json(m) for m, _ in every), key=lambda m: m.rank
        )
        checkpoints = sorted(
            (RankCheckpoints.model_validate_json(c) for _, c in every), key=lambda c: c.rank
        )
        return memories, checkpoints


def _gathered(mine: dict[str, str]) -> dict[str, str]:
    every: dict[str, str] = {}
    for entry in gather_object([mine]):
        every.update(entry)
    return every


def _agreed_digest(trainer: Any, exported_as: torch.dtype | None) -> str:
    """The parameters digest (of the tensors as exported), checked to be the same on every
    rank: ranks that trained apart (a broken collective, a wrong mesh) must not produce an
    artifact."""
    digest = parameters_digest(trainer.model, exported_as)
    log.info("rank %d: parameters digest %s", trainer.accelerator.process_index, digest)
    every_rank = set(gather_object([digest]))
    if len(every_rank) != 1:
        raise RuntimeError(f"the ranks hold different weights after training: {sorted(every_rank)}")
    return digest
