"""A DPO training run, top to bottom: config -> data -> models -> TRL trainer -> adapter.

Runs under `accelerate launch` on every rank. It resumes from the newest complete checkpoint by
itself, checkpoints and stops cleanly on SIGTERM, and at the end writes the adapter (or full
model) with a manifest of sha256 digests and `train.json`. A finished run started again returns
its recorded result instead of training twice.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from accelerate import PartialState
from dpo_contract.config import (
    HEALTH_ADVICE,
    DistributedConfig,
    HealthSignal,
    StoppedEarly,
    TrainerConfig,
)
from dpo_contract.pod import BadInputError
from dpo_contract.reports import TrainingReport
from transformers import TrainerCallback, set_seed

from dpo_trainer.distributed import (
    check_launch,
    keep_fsdp_on_cpu,
    require_gpus,
    set_collective_timeout,
)
from dpo_trainer.io.artifacts import TRAIN_REPORT, Artifacts
from dpo_trainer.io.checkpoints import CheckpointTransfer, step_of
from dpo_trainer.io.data import load_preferences, load_split
from dpo_trainer.io.models import load_model, load_tokenizer, torch_dtype
from dpo_trainer.train.callbacks import (
    SAVE_TOTAL_LIMIT,
    CheckDistributed,
    LogLines,
    MeasureStates,
    StopOnSignal,
    WatchHealth,
    WatchStragglers,
)
from dpo_trainer.train.fabric import (
    identity,
    log_nccl_transport,
    measure_fabric,
)
from dpo_trainer.train.finish import Finish
from dpo_trainer.train.memory import PhaseMemoryRecorder
from dpo_trainer.train.metrics import PrometheusCallback
from dpo_trainer.train.sharding import Models, load_sharded, row_shard, shards_the_model
from dpo_trainer.train.trl_trainer import build_trainer, precompute_reference

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 128 + signal.SIGTERM


class TrainingInterruptedError(Exception):
    """SIGTERM arrived: a checkpoint was written and the run can resume from it."""


def train(config: TrainerConfig) -> TrainingReport:
    """Train, or return the report of the run that already finished."""
    artifacts = Artifacts(config.artifacts_dir)
    finished = artifacts.read_report(TRAIN_REPORT, TrainingReport)
    if finished is not None:
        log.info("%s already finished; reporting its result", artifacts.uri)
        return finished

    distributed = config.distributed
    require_gpus(
        distributed.nproc_per_node if distributed.device == "cuda" else 0,
        "trainer.json (distributed.device: cuda)",
    )
    # Before NCCL starts: the first process of each pod logs which transport it picks.
    first_in_pod = os.environ.get("LOCAL_RANK", "0") == "0"
    nccl_log = log_nccl_transport(first_in_pod) if distributed.device == "cuda" else None
    # The first PartialState decides the process group for the whole process (a singleton); on
    # CPU only cpu=True makes it join the other ranks over gloo.
    # Startup's collectives wait on downloads and loads: the long timeout until training starts.
    state = PartialState(
        cpu=distributed.device == "cpu",
        timeout=timedelta(seconds=config.training.transfer_timeout_seconds),
    )
    check_world_size(distributed, state.num_processes)
    check_launch(distributed, str(state.distributed_type.value))
    if distributed.device == "cpu" and distributed.strategy in ("fsdp", "hsdp"):
        keep_fsdp_on_cpu()
    me = identity(state.process_index, state.local_process_index)
    fabric, fabric_signal = (
        measure_fabric(config.fabric, state.device, me, distributed.nnodes, nccl_log)
        if state.num_processes > 1
        else (None, None)
    )
    dtype = torch_dtype(config.training.mixed_precision)

    eval_rows, eval_report, held_out = None, None, None
    if config.data.hold_out is not None:
        train_rows, eval_rows, train_report, held_out = load_split(
            config.data.train, config.data.hold_out, config.data.columns, config.data.format
        )
    else:
        train_rows, train_report = load_preferences(
            config.data.train, config.data.columns, config.data.format
        )
    if config.data.eval is not None:
        eval_rows, eval_report = load_preferences(
            config.data.eval, config.data.columns, config.data.format
        )

    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    transfer = CheckpointTransfer(
        artifacts,
        rank=state.process_index,
        world=state.num_processes,
        shard=row_shard(distributed, state.process_index),
        keep=SAVE_TOTAL_LIMIT,
        global_batch=global_batch(config),
    )
    metrics = PrometheusCallback(
        config.job.name, config.job.namespace, config.metrics_port, serve=state.is_main_process
    )
    stopper = StopOnSignal(save=config.training.save_on_signal)
    checked = CheckDistributed(distributed)
    measured = MeasureStates()
    if fabric is not None and state.is_main_process:
        metrics.set_fabric(fabric)
        metrics.set_degraded({fabric_signal.reason} if fabric_signal else set(), source="fabric")
    health = WatchHealth(config.health, metrics)
    stragglers = WatchStragglers(me, state.device, config.health.straggler_factor, metrics)
    callbacks: list[TrainerCallback] = [
        checked,
        measured,
        metrics,
        health,
        stragglers,
        stopper,
        LogLines(),
    ]
    memory = PhaseMemoryRecorder(distributed.device)
    with memory.phase("load"):
        # Seeded before the policy is built, so a LoRA adapter starts the same on every rank and
        # in every run with the same seed, whatever the process did before.
        set_seed(config.training.seed)
        models = _load_models(config, state, dtype)
        trainer = build_trainer(
            config, transfer, models, tokenizer, train_rows, eval_rows, dtype, callbacks
        )
        read_bytes = models.read_bytes
        # The trainer holds the models now: the reference it frees after precomputing must not
        # stay alive here.
        del models
    with memory.phase("reference"):
        precompute_reference(trainer)
    resume = _checkpoint_to_resume(transfer)
    started = time.monotonic()
    try:
        set_collective_timeout(config.training.step_timeout_seconds)
        with memory.phase("train"):
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        set_collective_timeout(config.training.transfer_timeout_seconds)
        transfer.wait(config.training.transfer_timeout_seconds)
        if stopper.stopped:
            raise TrainingInterruptedError(f"stopped by signal at step {trainer.state.global_step}")
        stopped_early = _keep_last_healthy_checkpoint(trainer, transfer, config, health.stopped)
        final_eval = _final_evaluation(trainer) if eval_rows is not None else {}
        assert checked.ran is not None, "on_train_begin ran"
        finish = Finish(
            config=config,
            artifacts=artifacts,
            data={"train": train_report, "eval": eval_report},
            held_out=held_out,
            ran=checked.ran,
            states=measured.states,
            health=[
                *([fabric_signal] if fabric_signal else []),
                *health.raised.values(),
                *stragglers.raised,
            ],
            fabric=fabric,
            compute_by_rank=stragglers.by_rank,
            stopped_early=stopped_early,
            started=started,
            memory=memory,
            read_bytes=read_bytes,
            transfer=transfer,
        )
        return finish.write(trainer, metrics, final_eval)
    finally:
        metrics.close()


def _load_models(config: TrainerConfig, state: PartialState, dtype: Any) -> Models:
    """Under fsdp/hsdp: sharded before they are ever whole (dpo_trainer.train.sharding).
    Otherwise each process loads the whole policy, and a separate reference when there is one
    (a full fine-tune without one gets TRL's copy of the policy)."""
    if shards_the_model(config.distributed):
        return load_sharded(config, state.device, dtype)
    trust = config.trust_remote_code
    policy = load_model(config.model, trust_remote_code=trust, dtype=dtype)
    reference = None
    if config.reference is not None and not config.training.reference_free:
        reference = load_model(config.reference, trust_remote_code=trust, dtype=dtype)
    return Models(policy=policy, reference=reference)


def _keep_last_healthy_checkpoint(
    trainer: Any, transfer: CheckpointTransfer, config: TrainerConfig, cause: HealthSignal | None
) -> StoppedEarly | None:
    """After a stop on `cause`: the weights of the newest checkpoint, saved before it (none is
    saved once a signal is raised), become the adapter's. Every rank has sent its part of each
    checkpoint by now; once all have, all see the same newest complete one."""
    if cause is None:
        return None
    trainer.accelerator.wait_for_everyone()
    name = transfer.latest_complete()
    kept = transfer.fetch(name) if name is not None else None
    if kept is None:
        raise BadInputError(
            f"training stopped on {cause.reason} ({cause.message}) before its first checkpoint "
            f"(dpo.saveSteps {config.training.save_steps}): there are no healthy weights to keep; "
            f"{HEALTH_ADVICE[cause.reason]}, or save checkpoints more often"
        )
    # The loader resume uses: it knows PEFT adapters and FSDP's sharded checkpoints.
    trainer._load_from_checkpoint(str(kept))
    log.warning("the adapter is %s's weights, the last saved before %s", kept.name, cause.reason)
    return StoppedEarly(reason=cause.reason, step=cause.step, kept_step=step_of(kept.name))


def global_batch(config: TrainerConfig) -> int:
    """Pairs per optimizer step over every rank."""
    training = config.training
    return (
        training.per_device_train_batch_size
        * config.distributed.world_size
        * training.gradient_accumulation_steps
    )


def _checkpoint_to_resume(transfer: CheckpointTransfer) -> Path | None:
    """The newest complete checkpoint, with what this rank reads of it fetched by this rank. It
    may have been written at another world size (DCP reshards it) but not with another number
    of pairs per step: the step count would then no longer say which pairs were seen."""
    name = transfer.latest_complete()
    if name is None:
        return None
    written = transfer.written_by(name)
    theirs = written["globalBatch"]
    if theirs != transfer.global_batch:
        raise BadInputError(
            f"{name} was written with {theirs} pairs per optimizer step (world size "
            f"{written['world']}) and this run takes {transfer.global_batch} per step at world "
            f"size {transfer.world}: resumed, its steps would see other pairs; set "
            f"dpo.globalBatchSize: {theirs} (gradientAccumulationSteps is then derived at any "
            "size)"
        )
    if written["world"] != transfer.world:
        log.info(
            "%s was written at world size %d; resuming at %d, %d pairs per step as before",
            name,
            written["world"],
            transfer.world,
            theirs,
        )
    resume = transfer.fetch(name)
    log.info(
        "resuming from %s (rank %d fetched %d bytes of it)",
        resume,
        transfer.rank,
        transfer.counted.downloaded_bytes,
    )
    return resume


def _final_evaluation(trainer: Any) -> dict[str, float]:
    """The held-out metrics at the last step, evaluating only if that step was not evaluated."""
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry:
            if entry.get("step") == trainer.state.global_step:
                return {k: v for k, v in entry.items() if isinstance(v, int | float)}
            break
    evaluated: dict[str, float] = trainer.evaluate()
    return evaluated


def check_world_size(distributed: DistributedConfig, actual: int) -> None:
    """Refuse to train when the launch lost its rendezvous settings.

    Otherwise each node would train alone with world size 1 and report success.
    """
    if actual != distributed.world_size:
        raise BadInputError(
            f"world size is {actual} but the config expects {distributed.nnodes} nodes x "
            f"{distributed.nproc_per_node} processes = {distributed.world_size}; pass "
            "--num_machines, --machine_rank, --main_process_ip and --main_process_port to "
            "accelerate launch (it ignores torchrun's PET_* variables)"
        )
