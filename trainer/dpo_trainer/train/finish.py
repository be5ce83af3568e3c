"""The end of a run: the whole adapter (or model) saved with its manifest, and train.json."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from dpo_contract.config import (
    DistributedRun,
    HealthSignal,
    HeldOutReport,
    StoppedEarly,
    TrainerConfig,
)
from dpo_contract.manifest import write_manifest
from dpo_contract.reports import DataReport, TrainingReport

from dpo_trainer.distributed import parameters_digest, peak_memory_bytes
from dpo_trainer.io.artifacts import (
    ADAPTER,
    TRAIN_REPORT,
    Artifacts,
    name_served_base_model,
    replace_directory,
)
from dpo_trainer.train.metrics import PrometheusCallback

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
    stopped_early: StoppedEarly | None
    started: float

    def write(
        self, trainer: Any, metrics: PrometheusCallback, final_eval: dict[str, float]
    ) -> TrainingReport:
        """Save the whole adapter (or model) with its manifest and write train.json.

        Every rank takes part: gathering sharded tensors is a collective. Rank 0 writes the
        files.
        """
        config, artifacts, ran = self.config, self.artifacts, self.ran
        staging = artifacts.root / f".{ADAPTER}.partial"
        if trainer.is_fsdp_enabled:
            # Checkpoints stay sharded for resume; the final artifact is gathered into full tensors
            # so PEFT and transformers load it as they load any checkpoint.
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(staging))
        report = TrainingReport(
            job=config.job,
            step=trainer.state.global_step,
            world_size=ran.world_size,
            distributed=ran,
            # Rank 0's model and optimizer states (its shards) and peak: the memory plan's check.
            memory={**self.states, "peakBytes": peak_memory_bytes(ran.device)},
            seconds=round(time.monotonic() - self.started, 3),
            metrics=dict(metrics.latest),
            eval={k: v for k, v in final_eval.items() if isinstance(v, int | float)},
            data=self.data,
            held_out=self.held_out,
            adapter=f"{artifacts.uri.rstrip('/')}/{ADAPTER}",
            log_history=trainer.state.log_history,
            parameters_digest=_agreed_digest(trainer),
            health=self.health,
            stopped_early=self.stopped_early,
            reference_log_probs=getattr(trainer, "reference_reports", []),
            settings=config,
        )
        if trainer.accelerator.is_main_process:
            if config.lora is None:
                trainer.processing_class.save_pretrained(str(staging))
            elif config.promotion is not None:
                name_served_base_model(staging, config.promotion.served_model_name)
            report.adapter_digest = write_manifest(staging)
            replace_directory(staging, artifacts.adapter)
            artifacts.upload(ADAPTER)
            artifacts.write_report(TRAIN_REPORT, report)
        trainer.accelerator.wait_for_everyone()
        # Left to interpreter exit, gloo's threads are torn down mid-flight and a rank may abort
        # (`terminate called without an active exception`, exit -6) after a finished run.
        if dist.is_initialized():
            dist.destroy_process_group()
        return report


def _agreed_digest(trainer: Any) -> str:
    """The parameters digest, checked to be the same on every rank: ranks that trained apart
    (a broken collective, a wrong mesh) must not produce an artifact."""
    from accelerate.utils import gather_object

    digest = parameters_digest(trainer.model)
    log.info("rank %d: parameters digest %s", trainer.accelerator.process_index, digest)
    every_rank = set(gather_object([digest]))
    if len(every_rank) != 1:
        raise RuntimeError(f"the ranks hold different weights after training: {sorted(every_rank)}")
    return digest
