"""A DPO training run, top to bottom: config -> data -> models -> TRL trainer -> adapter.

Runs under `accelerate launch` on every rank. It resumes from the newest complete checkpoint by
itself, checkpoints and stops cleanly on SIGTERM, and at the end writes the adapter (or full
model) with a manifest of sha256 digests and `train.json`. A finished run started again returns
its recorded result instead of training twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import signal
import sys
import time
from datetime import timedelta
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from accelerate import PartialState
from datasets import Dataset
from transformers import (
    PrinterCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from trl import DPOConfig, DPOTrainer

from dpo_trainer.artifacts import (
    ADAPTER,
    CHECKPOINTS,
    TRAIN_REPORT,
    Artifacts,
    replace_directory,
    write_manifest,
)
from dpo_trainer.config import BadInputError, DistributedConfig, TrainerConfig
from dpo_trainer.data import load_preferences
from dpo_trainer.metrics import PrometheusCallback
from dpo_trainer.models import load_model, load_tokenizer, lora_config, torch_dtype

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 128 + signal.SIGTERM
# Never more than this many checkpoints on disk: resuming needs only the newest complete one.
SAVE_TOTAL_LIMIT = 2


class TrainingInterruptedError(Exception):
    """SIGTERM arrived: a checkpoint was written and the run can resume from it."""


def train(config: TrainerConfig) -> dict[str, Any]:
    """Train, or return the result of the run that already finished. Returns the summary."""
    artifacts = Artifacts(config.artifacts_dir)
    finished = artifacts.read_json(TRAIN_REPORT)
    if finished is not None and finished.get("status") == "completed":
        log.info("%s already finished; reporting its result", artifacts.uri)
        return finished

    # The first PartialState decides the process group for the whole process (a singleton); on
    # CPU only cpu=True makes it join the other ranks over gloo.
    state = PartialState(
        cpu=not torch.cuda.is_available(),
        timeout=timedelta(seconds=config.training.ddp_timeout_seconds),
    )
    check_world_size(config.distributed, state.num_processes)
    dtype = torch_dtype(config.training.mixed_precision)

    train_rows, train_report = load_preferences(
        config.data.train, config.data.columns, config.data.format
    )
    eval_rows, eval_report = (None, None)
    if config.data.eval is not None:
        eval_rows, eval_report = load_preferences(
            config.data.eval, config.data.columns, config.data.format
        )

    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    policy = load_model(config.model, trust_remote_code=config.trust_remote_code, dtype=dtype)
    reference = None
    if config.reference is not None and not config.training.reference_free:
        reference = load_model(
            config.reference, trust_remote_code=config.trust_remote_code, dtype=dtype
        )

    metrics = PrometheusCallback(
        config.job.name, config.job.namespace, config.metrics_port, serve=state.is_main_process
    )
    stopper = StopOnSignal()
    callbacks: list[TrainerCallback] = [metrics, stopper, LogLines()]
    trainer = _trainer(
        config, artifacts, policy, reference, tokenizer, train_rows, eval_rows, dtype, callbacks
    )
    resume = artifacts.latest_checkpoint()
    if resume is not None:
        log.info("resuming from %s", resume)
    started = time.monotonic()
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        if stopper.stopped:
            raise TrainingInterruptedError(f"stopped by signal at step {trainer.state.global_step}")
        final_eval = _final_evaluation(trainer) if eval_rows is not None else {}
        return _finish(
            config, artifacts, trainer, metrics, final_eval, train_report, eval_report, started
        )
    finally:
        metrics.close()


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


def training_arguments(
    config: TrainerConfig, output_dir: str, dtype: torch.dtype
) -> TrainingArguments:
    """DPOConfig (or CPOConfig for reference-free SimPO) from the trainer config."""
    training = config.training
    common: dict[str, Any] = {
        "output_dir": output_dir,
        "per_device_train_batch_size": training.per_device_train_batch_size,
        "per_device_eval_batch_size": training.per_device_train_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "learning_rate": training.learning_rate,
        "num_train_epochs": training.num_train_epochs,
        "max_steps": training.max_steps or -1,
        "beta": training.beta,
        "max_length": training.max_length,
        "seed": training.seed,
        "data_seed": training.seed,
        "logging_steps": training.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": training.save_steps,
        "save_total_limit": SAVE_TOTAL_LIMIT,
        "eval_strategy": "steps" if config.data.eval is not None else "no",
        "eval_steps": training.save_steps,
        "bf16": dtype == torch.bfloat16,
        "ddp_timeout": training.ddp_timeout_seconds,
        "report_to": "none",
        "disable_tqdm": not sys.stderr.isatty(),
        "dataloader_num_workers": 0,
        "use_cpu": not torch.cuda.is_available(),
    }
    if training.reference_free:
        from trl.experimental.cpo import CPOConfig

        common[_checkpointing_field(CPOConfig)] = training.gradient_checkpointing
        return _config_with_extra(
            CPOConfig,
            {**common, "loss_type": "simpo", "simpo_gamma": training.simpo_gamma, "cpo_alpha": 0.0},
            training.extra,
        )
    common[_checkpointing_field(DPOConfig)] = training.gradient_checkpointing
    return _config_with_extra(
        DPOConfig,
        {
            **common,
            "loss_type": list(training.loss_type),
            "loss_weights": training.loss_weights,
            "precompute_ref_log_probs": training.precompute_ref_log_probs,
        },
        training.extra,
    )


def _checkpointing_field(config_class: type[TrainingArguments]) -> str:
    """transformers 5 renamed gradient_checkpointing; use the name this version has."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return (
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else ("gradient_checkpointing")
    )


def _config_with_extra(
    config_class: type[TrainingArguments], fields: dict[str, Any], extra: dict[str, Any]
) -> TrainingArguments:
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise BadInputError(
            f"spec.dpo.extra: {', '.join(unknown)} are not fields of {config_class.__name__}; "
            "remove them or check their spelling in TRL's documentation"
        )
    try:
        return config_class(**{**fields, **extra})
    except (TypeError, ValueError) as error:
        raise BadInputError(
            f"spec.dpo: {config_class.__name__} rejected the settings: {error}"
        ) from None


def _trainer(
    config: TrainerConfig,
    artifacts: Artifacts,
    policy: Any,
    reference: Any,
    tokenizer: Any,
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]] | None,
    dtype: torch.dtype,
    callbacks: list[TrainerCallback],
) -> Any:
    args: Any = training_arguments(config, str(artifacts.checkpoints), dtype)
    peft_config = lora_config(config.lora) if config.lora is not None else None
    datasets = {
        "train_dataset": Dataset.from_list(train_rows),
        "eval_dataset": Dataset.from_list(eval_rows) if eval_rows is not None else None,
    }
    callbacks = [*callbacks, UploadCheckpoints(artifacts)]
    if config.training.reference_free:
        from trl.experimental.cpo import CPOTrainer

        trainer: Any = CPOTrainer(
            model=policy,
            args=args,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
            **datasets,
        )
    else:
        trainer = DPOTrainer(
            model=policy,
            ref_model=reference,
            args=args,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
            **datasets,
        )
    # LogLines prints one readable line per log instead of the raw dict.
    trainer.remove_callback(PrinterCallback)
    return trainer


def _finish(
    config: TrainerConfig,
    artifacts: Artifacts,
    trainer: Any,
    metrics: PrometheusCallback,
    final_eval: dict[str, float],
    train_report: Any,
    eval_report: Any,
    started: float,
) -> dict[str, Any]:
    """Save the adapter with its manifest and write train.json (rank 0 writes files)."""
    staging = artifacts.root / f".{ADAPTER}.partial"
    trainer.save_model(str(staging))
    summary: dict[str, Any] = {
        "status": "completed",
        "job": config.job.name,
        "namespace": config.job.namespace,
        "uid": config.job.uid,
        "step": trainer.state.global_step,
        "worldSize": trainer.accelerator.num_processes,
        "seconds": round(time.monotonic() - started, 3),
        "metrics": dict(metrics.latest),
        "eval": {k: v for k, v in final_eval.items() if isinstance(v, int | float)},
        "data": {
            "train": train_report.as_dict(),
            "eval": eval_report.as_dict() if eval_report is not None else None,
        },
        "adapter": f"{artifacts.uri.rstrip('/')}/{ADAPTER}",
        "logHistory": trainer.state.log_history,
        "parametersDigest": trainable_parameters_digest(trainer.model),
    }
    if trainer.accelerator.is_main_process:
        if config.lora is None:
            trainer.processing_class.save_pretrained(str(staging))
        summary["adapterDigest"] = write_manifest(staging)
        replace_directory(staging, artifacts.adapter)
        artifacts.upload(ADAPTER)
        artifacts.upload(CHECKPOINTS)
        artifacts.write_json(TRAIN_REPORT, summary)
    trainer.accelerator.wait_for_everyone()
    return summary


def trainable_parameters_digest(model: Any) -> str:
    """A digest of the trainable weights: equal on every rank when they trained together."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


class StopOnSignal(TrainerCallback):
    """On SIGTERM, finish the current step, write a checkpoint, and stop.

    Every rank must stop at the same step (the checkpoint is a collective), so the flag is
    agreed on with an all-reduce at each step end.
    """

    def __init__(self) -> None:
        self.requested = False
        self.stopped = False
        self._previous = signal.signal(signal.SIGTERM, self._request)

    def _request(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        self.requested = True

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        requested = self.requested
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([1 if requested else 0], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())
        if requested:
            log.warning("termination requested: checkpointing at step %d", state.global_step)
            control.should_save = True
            control.should_training_stop = True
            self.stopped = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        signal.signal(signal.SIGTERM, self._previous)


class UploadCheckpoints(TrainerCallback):
    """Copy each checkpoint to the object store as soon as it is written."""

    def __init__(self, artifacts: Artifacts) -> None:
        self.artifacts = artifacts

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if state.is_world_process_zero:
            self.artifacts.upload(f"{CHECKPOINTS}/checkpoint-{state.global_step}")


class LogLines(TrainerCallback):
    """One line per logging step when no progress bar is shown (not a terminal)."""

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **_: Any,
    ) -> None:
        if not args.disable_tqdm or not state.is_world_process_zero or not logs:
            return
        shown = {
            key: value
            for key, value in logs.items()
            if key
            in (
                "loss",
                "eval_loss",
                "rewards/accuracies",
                "eval_rewards/accuracies",
                "rewards/margins",
                "eval_rewards/margins",
                "learning_rate",
            )
        }
        if not shown:
            return
        text = " ".join(f"{key}={value:.4g}" for key, value in shown.items())
        total = state.max_steps or "?"
        print(f"step {state.global_step}/{total} epoch {state.epoch or 0:.2f} {text}", flush=True)
