"""TRL's trainer as a run needs it: DPOConfig (or CPOConfig for SimPO) from trainer.json, and a
DPOTrainer that precomputes reference log-probs on every rank, through the cache.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Any

import torch
from datasets import Dataset
from dpo_contract.config import DEFAULT_CONFIDENCE, TrainerConfig
from dpo_contract.pod import BadInputError
from dpo_contract.reports import ReferenceLogProbsReport
from torch.utils.data import DataLoader
from transformers import PrinterCallback, TrainerCallback, TrainingArguments
from trl import DPOConfig, DPOTrainer
from trl import __version__ as trl_version

from dpo_trainer.io.checkpoints import CheckpointTransfer
from dpo_trainer.io.models import lora_config
from dpo_trainer.train.callbacks import SAVE_TOTAL_LIMIT, NeedsAccelerator, SendCheckpoints
from dpo_trainer.train.metrics import margin_interval
from dpo_trainer.train.reference_cache import (
    LOG_PROB_SETTINGS,
    CachedLogProbs,
    ReferenceCache,
    combine,
    dataset_digest,
    weights_digest,
)
from dpo_trainer.train.sharding import (
    Models,
    adapter_initial_weights,
    materialize_policy,
    replica_sync_on_last_micro_batch,
)

log = logging.getLogger(__name__)


def training_arguments(
    config: TrainerConfig,
    output_dir: str,
    dtype: torch.dtype,
    save_total_limit: int | None = SAVE_TOTAL_LIMIT,
) -> TrainingArguments:
    """DPOConfig (or CPOConfig for reference-free SimPO) from the trainer config; the Trainer
    deletes checkpoints beyond `save_total_limit` (None: it leaves them to the caller)."""
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
        "save_total_limit": save_total_limit,
        "eval_strategy": "no"
        if config.data.eval is None and config.data.hold_out is None
        else "steps",
        "eval_steps": training.save_steps,
        "bf16": dtype == torch.bfloat16,
        "ddp_timeout": training.step_timeout_seconds,
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


def build_trainer(
    config: TrainerConfig,
    transfer: CheckpointTransfer,
    models: Models,
    tokenizer: Any,
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]] | None,
    dtype: torch.dtype,
    callbacks: list[TrainerCallback],
) -> Any:
    """TRL's trainer around the run's models. Under fsdp/hsdp the policy reaches it on the meta
    device, so that LoRA goes in before it is sharded; it is sharded and filled here."""
    artifacts = transfer.artifacts
    # In an object store the local copies go once sent (the transfer prunes them); the Trainer
    # would delete folders another rank of the pod may still be sending.
    args: Any = training_arguments(
        config,
        str(artifacts.checkpoints),
        dtype,
        save_total_limit=SAVE_TOTAL_LIMIT if artifacts.is_local else None,
    )
    # A sharded policy is precomputed with by `precompute_reference` once it is filled: TRL
    # would compute in its constructor, and hash the whole reference on one process first.
    precompute = config.training.precompute_ref_log_probs
    deferred = models.mesh is not None and precompute
    if deferred:
        args.precompute_ref_log_probs = False
    peft_config = lora_config(config.lora) if config.lora is not None else None
    datasets = {
        "train_dataset": Dataset.from_list(train_rows),
        "eval_dataset": Dataset.from_list(eval_rows) if eval_rows is not None else None,
    }
    callbacks = [*callbacks, SendCheckpoints(transfer)]
    if config.training.reference_free:
        from trl.experimental.cpo import CPOTrainer

        trainer: Any = CPOTrainer(
            model=models.policy,
            args=args,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
            **datasets,
        )
    else:
        trainer = PrecomputeOnEveryRank(
            model=models.policy,
            ref_model=models.reference,
            args=args,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
            reference_cache=ReferenceCache(config.reference_cache)
            if config.reference_cache
            else None,
            confidence=config.gate.confidence if config.gate else DEFAULT_CONFIDENCE,
            **datasets,
        )
    if deferred:
        args.precompute_ref_log_probs = True
    elif precompute:
        _free_reference(trainer)
    if models.mesh is not None:
        device = trainer.accelerator.device
        materialize_policy(trainer.model, models, config, device, dtype)
        hsdp = config.distributed.strategy == "hsdp"
        trainer.accelerator.no_sync = lambda model: replica_sync_on_last_micro_batch(model, hsdp)
    elif config.lora is not None:
        adapter_initial_weights(trainer.model, config.training.seed)
    # LogLines prints one readable line per log instead of the raw dict.
    trainer.remove_callback(PrinterCallback)
    for callback in callbacks:
        if isinstance(callback, NeedsAccelerator):
            callback.accelerator = trainer.accelerator
    return trainer


def precompute_reference(trainer: Any) -> None:
    """The reference log-probs of the train and eval pairs with the sharded models, when the run
    precomputes them and TRL's constructor did not (it does for unsharded models); the
    reference is then freed (it is not needed for training)."""
    if not isinstance(trainer, PrecomputeOnEveryRank):
        return  # SimPO: reference-free
    args: Any = trainer.args  # a DPOConfig
    if not args.precompute_ref_log_probs or trainer.reference_reports:
        return
    trainer.precompute_ref_logps = True
    train_batch = args.precompute_ref_batch_size or args.per_device_train_batch_size
    precompute = trainer._precompute_ref_logps
    trainer.train_dataset = precompute(trainer.train_dataset, "train", train_batch)
    if trainer.eval_dataset is not None:
        eval_batch = args.precompute_ref_batch_size or args.per_device_eval_batch_size
        trainer.eval_dataset = precompute(trainer.eval_dataset, "eval", eval_batch)
    _free_reference(trainer)


def _free_reference(trainer: Any) -> None:
    """After the reference log-probs were precomputed, the separate reference is not kept for
    training: TRL frees only a copy it made itself, and accelerate keeps every model it
    prepared."""
    reference = trainer.ref_model
    trainer.ref_model = None
    if reference is not None:
        accelerator = trainer.accelerator
        accelerator._models = [m for m in accelerator._models if m is not reference]


class PrecomputeOnEveryRank(DPOTrainer):
    """TRL's DPOTrainer, with the precomputed reference log-probs kept in every rank's memory,
    and taken from the reference cache (dpo_trainer.train.reference_cache) when a run before
    computed the same ones.

    TRL's precompute has only global rank 0 write the new columns to a dataset cache file, in
    that process's own temporary directory for an in-memory dataset, and every rank then reads
    that file: other processes, and every other pod, cannot open it. Here each rank adds the
    gathered values to its own copy of the dataset; nothing on disk is shared, so it works
    within a pod and across pods alike.
    """

    def __init__(
        self,
        *args: Any,
        reference_cache: ReferenceCache | None,
        confidence: float,
        **kwargs: Any,
    ) -> None:
        # Set before TRL's __init__, which precomputes.
        self.reference_cache = reference_cache
        self.confidence = confidence
        self.reference_reports: list[ReferenceLogProbsReport] = []
        self._reference_digest: str | None = None
        super().__init__(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's log, and at an evaluation the held-out margin's interval, from the batch means
        TRL keeps until it averages them here (a sweep stops a trial by it)."""
        if self.model is not None and not self.model.training:
            batches = self._metrics["eval"].get("rewards/margins", [])
            logs.update(
                {f"eval_{k}": v for k, v in margin_interval(batches, self.confidence).items()}
            )
        super().log(logs, start_time)

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
        chosen_all, rejected_all = torch.cat(chosen), torch.cat(rejected)
        if len(chosen_all) != len(dataset):
            raise RuntimeError(
                f"precomputed {len(chosen_all)} reference log-probs for the {len(dataset)} pairs "
                f"of the {name} set"
            )
        log.info("precomputed reference log-probs for %d %s pairs", len(dataset), name)
        return CachedLogProbs(chosen_all, rejected_all, reused=False)
