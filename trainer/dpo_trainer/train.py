"""A DPO training run, top to bottom: config -> data -> models -> TRL trainer -> adapter.

Runs under `accelerate launch` on every rank. It resumes from the newest complete checkpoint by
itself, checkpoints and stops cleanly on SIGTERM, and at the end writes the adapter (or full
model) with a manifest of sha256 digests and `train.json`. A finished run started again returns
its recorded result instead of training twice.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from accelerate import PartialState
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import (
    PrinterCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)
from trl import DPOConfig, DPOTrainer
from trl import __version__ as trl_version

from dpo_trainer.artifacts import (
    ADAPTER,
    CHECKPOINT_COMPLETE_MARKER,
    CHECKPOINTS,
    TRAIN_REPORT,
    Artifacts,
    name_served_base_model,
    replace_directory,
)
from dpo_trainer.config import (
    HEALTH_ADVICE,
    BadInputError,
    DataReport,
    DistributedConfig,
    DistributedRun,
    HealthConfig,
    HealthReason,
    HealthSignal,
    HeldOutReport,
    ReferenceLogProbsReport,
    StoppedEarly,
    TrainerConfig,
    TrainingReport,
)
from dpo_trainer.data import load_preferences, load_split
from dpo_trainer.distributed import (
    check_run,
    describe_run,
    keep_fsdp_on_cpu,
    parameters_digest,
    peak_memory_bytes,
    require_gpus,
    state_bytes,
)
from dpo_trainer.health import HealthWatch, StepLog
from dpo_trainer.manifest import write_manifest
from dpo_trainer.metrics import PrometheusCallback
from dpo_trainer.models import load_model, load_tokenizer, lora_config, torch_dtype
from dpo_trainer.reference_cache import (
    LOG_PROB_SETTINGS,
    CachedLogProbs,
    ReferenceCache,
    combine,
    dataset_digest,
    weights_digest,
)

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 128 + signal.SIGTERM
# Never more than this many checkpoints on disk: resuming needs only the newest complete one.
SAVE_TOTAL_LIMIT = 2


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
    # The first PartialState decides the process group for the whole process (a singleton); on
    # CPU only cpu=True makes it join the other ranks over gloo.
    state = PartialState(
        cpu=distributed.device == "cpu",
        timeout=timedelta(seconds=config.training.ddp_timeout_seconds),
    )
    check_world_size(distributed, state.num_processes)
    if distributed.device == "cpu" and distributed.strategy in ("fsdp", "hsdp"):
        keep_fsdp_on_cpu()
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
    # Seeded before the policy is built, so a LoRA adapter starts the same on every rank and in
    # every run with the same seed, whatever the process did before.
    set_seed(config.training.seed)
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
    checked = CheckDistributed(distributed)
    measured = MeasureStates()
    health = WatchHealth(config.health, metrics)
    callbacks: list[TrainerCallback] = [checked, measured, metrics, health, stopper, LogLines()]
    trainer = _trainer(
        config, artifacts, policy, reference, tokenizer, train_rows, eval_rows, dtype, callbacks
    )
    resume = _checkpoint_to_resume(artifacts, state)
    started = time.monotonic()
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        if stopper.stopped:
            raise TrainingInterruptedError(f"stopped by signal at step {trainer.state.global_step}")
        stopped_early = _keep_last_healthy_checkpoint(trainer, artifacts, config, health.stopped)
        final_eval = _final_evaluation(trainer) if eval_rows is not None else {}
        assert checked.ran is not None, "on_train_begin ran"
        return _finish(
            config,
            artifacts,
            trainer,
            metrics,
            checked.ran,
            measured.states,
            final_eval,
            train_report,
            eval_report,
            held_out,
            started,
            list(health.raised.values()),
            stopped_early,
        )
    finally:
        metrics.close()


def _keep_last_healthy_checkpoint(
    trainer: Any, artifacts: Artifacts, config: TrainerConfig, cause: HealthSignal | None
) -> StoppedEarly | None:
    """After a stop on `cause`: the weights of the newest checkpoint, saved before it (none is
    saved once a signal is raised), become the adapter's."""
    if cause is None:
        return None
    kept = artifacts.latest_checkpoint()
    if kept is None:
        raise BadInputError(
            f"training stopped on {cause.reason} ({cause.message}) before its first checkpoint "
            f"(dpo.saveSteps {config.training.save_steps}): there are no healthy weights to keep; "
            f"{HEALTH_ADVICE[cause.reason]}, or save checkpoints more often"
        )
    # The loader resume uses: it knows PEFT adapters and FSDP's sharded checkpoints.
    trainer._load_from_checkpoint(str(kept))
    log.warning("the adapter is %s's weights, the last saved before %s", kept.name, cause.reason)
    return StoppedEarly(reason=cause.reason, step=cause.step, kept_step=_checkpoint_step(kept))


def _checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def _checkpoint_to_resume(artifacts: Artifacts, state: PartialState) -> Path | None:
    """The newest complete checkpoint, brought into this pod by one process per pod."""
    if state.is_local_main_process:
        name = artifacts.latest_remote_checkpoint()
        if name is not None:
            artifacts.download_checkpoint(name)
    state.wait_for_everyone()
    resume = artifacts.latest_checkpoint()
    if resume is not None:
        log.info("resuming from %s", resume)
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
        # A NaN loss is logged as NaN, not averaged away: the health watch must see it.
        "logging_nan_inf_filter": False,
        "save_strategy": "steps",
        "save_steps": training.save_steps,
        "save_total_limit": SAVE_TOTAL_LIMIT,
        "eval_strategy": "no"
        if config.data.eval is None and config.data.hold_out is None
        else "steps",
        "eval_steps": training.save_steps,
        "bf16": dtype == torch.bfloat16,
        "ddp_timeout": training.ddp_timeout_seconds,
        "report_to": "none",
        "disable_tqdm": not sys.stderr.isatty(),
        "dataloader_num_workers": 0,
        "use_cpu": config.distributed.device == "cpu",
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
        trainer = PrecomputeOnEveryRank(
            model=policy,
            ref_model=reference,
            args=args,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
            reference_cache=ReferenceCache(config.reference_cache)
            if config.reference_cache
            else None,
            **datasets,
        )
    if config.training.precompute_ref_log_probs:
        # Scored once: a separate reference is not kept for training (TRL frees only the copy
        # it made itself).
        trainer.ref_model = None
    # LogLines prints one readable line per log instead of the raw dict.
    trainer.remove_callback(PrinterCallback)
    for callback in callbacks:
        if isinstance(callback, NeedsAccelerator):
            callback.accelerator = trainer.accelerator
    return trainer


class PrecomputeOnEveryRank(DPOTrainer):
    """TRL's DPOTrainer, with the precomputed reference log-probs kept in every rank's memory,
    and taken from the reference cache (dpo_trainer.reference_cache) when a run before computed
    the same ones.

    TRL's precompute has only global rank 0 write the new columns to a dataset cache file, in
    that process's own temporary directory for an in-memory dataset, and every rank then reads
    that file: other processes, and every other pod, cannot open it. Here each rank adds the
    gathered values to its own copy of the dataset; nothing on disk is shared, so it works
    within a pod and across pods alike.
    """

    def __init__(self, *args: Any, reference_cache: ReferenceCache | None, **kwargs: Any) -> None:
        # Set before TRL's __init__, which precomputes.
        self.reference_cache = reference_cache
        self.reference_reports: list[ReferenceLogProbsReport] = []
        self._reference_digest: str | None = None
        super().__init__(*args, **kwargs)

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        started = time.monotonic()
        reference: Any = self.ref_model or self.model
        cache = self.reference_cache
        key = None
        cached = None
        if cache is not None:  # without one, nothing is worth hashing the weights and data for
            key, fields = self._cache_key(reference, dataset)
            cached = cache.load(key, len(dataset))
        if cached is None:
            cached = self._compute_ref_logps(reference, dataset, name, batch_size)
            if cache is not None and key is not None and self.accelerator.is_main_process:
                cache.store(key, fields, cached)
        elif cache is not None:
            log.info("reference log-probs of the %s pairs reused from %s/%s", name, cache.uri, key)
        self.reference_reports.append(
            ReferenceLogProbsReport(
                split=name,
                pairs=len(dataset),
                key=key,
                reused=cached.reused,
                seconds=round(time.monotonic() - started, 3),
            )
        )
        return dataset.add_column("ref_chosen_logps", cached.chosen.tolist()).add_column(
            "ref_rejected_logps", cached.rejected.tolist()
        )

    def _cache_key(self, reference: Any, dataset: Dataset) -> tuple[str, dict[str, Any]]:
        if self._reference_digest is None:
            digest, sharded = weights_digest(reference)
            if sharded:  # every rank holds other shards: the key is all of them
                from accelerate.utils import gather_object

                digest = combine(gather_object([digest]))
            self._reference_digest = digest
        fields: dict[str, Any] = {
            "reference": self._reference_digest,
            "pairs": dataset_digest(dataset.with_format("arrow")[:]),
            "dtype": str(next(reference.parameters()).dtype),
            "autocast": "bf16" if self.args.bf16 else "fp16" if self.args.fp16 else "none",
            "trl": trl_version,
            **{setting: getattr(self.args, setting) for setting in LOG_PROB_SETTINGS},
        }
        return ReferenceCache.key(fields), fields

    def _compute_ref_logps(
        self, reference: Any, dataset: Dataset, name: str, batch_size: int
    ) -> CachedLogProbs:
        loader = self.accelerator.prepare(
            DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator)
        )
        # Under FSDP the policy is sharded and placed on its GPU only when training starts; a
        # LoRA reference is that policy with the adapter disabled, so it visits the GPU here.
        home = next(reference.parameters()).device
        visiting = home != self.accelerator.device
        if visiting:
            reference.to(self.accelerator.device)
        chosen, rejected = [], []
        for batch in loader:
            chosen_logps, rejected_logps = self.compute_ref_log_probs(  # type: ignore[no-untyped-call]
                reference, batch
            )
            chosen_logps, rejected_logps = self.accelerator.gather_for_metrics(
                (chosen_logps, rejected_logps)
            )
            chosen.append(chosen_logps.float().cpu())
            rejected.append(rejected_logps.float().cpu())
        if visiting:
            reference.to(home)
        chosen_all, rejected_all = torch.cat(chosen), torch.cat(rejected)
        if len(chosen_all) != len(dataset):
            raise RuntimeError(
                f"precomputed {len(chosen_all)} reference log-probs for the {len(dataset)} pairs "
                f"of the {name} set"
            )
        log.info("precomputed reference log-probs for %d %s pairs", len(dataset), name)
        return CachedLogProbs(chosen_all, rejected_all, reused=False)


def _finish(
    config: TrainerConfig,
    artifacts: Artifacts,
    trainer: Any,
    metrics: PrometheusCallback,
    ran: DistributedRun,
    states: dict[str, int],
    final_eval: dict[str, float],
    train_report: DataReport,
    eval_report: DataReport | None,
    held_out: HeldOutReport | None,
    started: float,
    health: list[HealthSignal],
    stopped_early: StoppedEarly | None,
) -> TrainingReport:
    """Save the whole adapter (or model) with its manifest and write train.json.

    Every rank takes part: gathering sharded tensors is a collective. Rank 0 writes the files.
    """
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
        memory={**states, "peakBytes": peak_memory_bytes(ran.device)},
        seconds=round(time.monotonic() - started, 3),
        metrics=dict(metrics.latest),
        eval={k: v for k, v in final_eval.items() if isinstance(v, int | float)},
        data={"train": train_report, "eval": eval_report},
        held_out=held_out,
        adapter=f"{artifacts.uri.rstrip('/')}/{ADAPTER}",
        log_history=trainer.state.log_history,
        parameters_digest=_agreed_digest(trainer),
        health=health,
        stopped_early=stopped_early,
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


class NeedsAccelerator:
    """A callback that is handed the trainer's accelerator once the trainer exists."""

    accelerator: Any = None


class MeasureStates(TrainerCallback):
    """After the first optimizer step, when the optimizer's states exist: the bytes this rank
    holds of parameters, trainable parameters and optimizer states."""

    def __init__(self) -> None:
        self.states: dict[str, int] = {}

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        optimizer: Any = None,
        **_: Any,
    ) -> None:
        if not self.states and optimizer is not None:
            self.states = state_bytes(model, optimizer)


class CheckDistributed(TrainerCallback, NeedsAccelerator):
    """Once the model is prepared, records what really runs and stops when it is not what
    trainer.json renders (before the first step)."""

    def __init__(self, expected: DistributedConfig) -> None:
        self.expected = expected
        self.ran: DistributedRun | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **_: Any,
    ) -> None:
        self.ran = describe_run(self.accelerator, model)
        if state.is_world_process_zero:
            log.info("running %s", self.ran.model_dump_json(by_alias=True))
        check_run(self.expected, self.ran)


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


class WatchHealth(TrainerCallback):
    """Judges each training log (dpo_trainer.health): logs each signal when first raised, shows
    the ones that hold on /metrics (`dpo_train_degraded`), and with `health.action: stop` ends
    training at the first, before the step's checkpoint is saved.

    Every rank sees the same logged values (TRL gathers them), so every rank stops at the same
    step."""

    def __init__(self, config: HealthConfig, metrics: PrometheusCallback) -> None:
        self.config = config
        self.metrics = metrics
        self.watch = HealthWatch(warmup_steps=config.warmup_steps or 0)
        self.stopped: HealthSignal | None = None

    @property
    def raised(self) -> dict[HealthReason, HealthSignal]:
        return self.watch.raised

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if self.config.warmup_steps is None:
            self.watch.warmup_steps = state.max_steps // 10

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **_: Any,
    ) -> None:
        if not logs or "loss" not in logs:  # an eval log, or the end-of-training summary
            return

        def number(key: str) -> float | None:
            value = logs.get(key)
            return float(value) if isinstance(value, int | float) else None

        seen = StepLog(
            step=state.global_step,
            loss=number("loss"),
            accuracy=number("rewards/accuracies"),
            margin=number("rewards/margins"),
            chosen=number("rewards/chosen"),
            grad_norm=number("grad_norm"),
        )
        first = set(self.watch.raised)
        signals = self.watch.observe(seen)
        self.metrics.set_degraded({found.reason for found in signals})
        for found in signals:
            if found.reason not in first and state.is_world_process_zero:
                log.warning("health: %s: %s", found.reason, found.message)
        if signals and self.config.action == "stop" and self.stopped is None:
            self.stopped = signals[0]
            control.should_training_stop = True
            control.should_save = False
            if state.is_world_process_zero:
                log.error(
                    "health.action is stop: training ends at step %d on %s",
                    state.global_step,
                    signals[0].reason,
                )


class UploadCheckpoints(TrainerCallback, NeedsAccelerator):
    """Copy each checkpoint to the object store as soon as it is written, whole.

    A sharded checkpoint is written by every rank into its own pod's disk, so one process per
    pod uploads what its pod holds; once every pod is done, rank 0 uploads the completion marker
    that makes the checkpoint count for resume, and drops checkpoints beyond the newest few.
    """

    def __init__(self, artifacts: Artifacts) -> None:
        self.artifacts = artifacts

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if self.artifacts.is_local:
            return
        name = f"{CHECKPOINTS}/checkpoint-{state.global_step}"
        self.accelerator.wait_for_everyone()  # every rank has written its part (RNG state last)
        if self.accelerator.is_local_main_process:
            self.artifacts.upload(name, skip=(CHECKPOINT_COMPLETE_MARKER,))
        self.accelerator.wait_for_everyone()
        if state.is_world_process_zero:
            self.artifacts.upload(f"{name}/{CHECKPOINT_COMPLETE_MARKER}")
        if self.accelerator.is_local_main_process:
            self.artifacts.prune_checkpoints(SAVE_TOTAL_LIMIT, remote=state.is_world_process_zero)


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
