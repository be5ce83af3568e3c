"""The Trainer callbacks a run installs, one per concern: what really ran, the states each rank
holds, SIGTERM, DPO's health, sending checkpoints and the log lines `dpo run` shows.
"""

from __future__ import annotations

import logging
import signal
import statistics
import time
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from dpo_contract.config import (
    DegradedReason,
    DistributedConfig,
    DistributedRun,
    HealthConfig,
    HealthSignal,
)
from dpo_contract.reports import RankProbe
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from dpo_trainer.distributed import check_run, describe_run, state_bytes
from dpo_trainer.io.checkpoints import CheckpointTransfer
from dpo_trainer.train.fabric import (
    Identity,
    RankTime,
    StragglerWatch,
    gather_probe,
    straggler_message,
)
from dpo_trainer.train.health import HealthWatch, StepLog
from dpo_trainer.train.metrics import PrometheusCallback

log = logging.getLogger(__name__)

# Never more than this many checkpoints on disk: resuming needs only the newest complete one.
SAVE_TOTAL_LIMIT = 2


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
    """On SIGTERM, finish the current step, write a checkpoint (unless `save` is false: one
    would not fit in the pods' grace period), and stop.

    Every rank must stop at the same step (the checkpoint is a collective), so the flag is
    agreed on with an all-reduce at each step end.
    """

    def __init__(self, save: bool = True) -> None:
        self.save = save
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
            if self.save:
                log.warning("termination requested: checkpointing at step %d", state.global_step)
            else:
                log.warning(
                    "termination requested at step %d: stopping without a checkpoint (one would "
                    "not fit in the grace period, runPolicy.terminationGracePeriodSeconds); the "
                    "run resumes from its last periodic checkpoint",
                    state.global_step,
                )
            control.should_save = self.save
            control.should_training_stop = True
            self.stopped = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        signal.signal(signal.SIGTERM, self._previous)


class WatchHealth(TrainerCallback):
    """Judges each training log (dpo_trainer.train.health): logs each signal when first raised,
    shows the ones that hold on /metrics (`dpo_train_degraded`), and with `health.action: stop` ends
    training at the first, before the step's checkpoint is saved.

    Every rank sees the same logged values (TRL gathers them), so every rank stops at the same
    step."""

    def __init__(self, config: HealthConfig, metrics: PrometheusCallback) -> None:
        self.config = config
        self.metrics = metrics
        self.watch = HealthWatch(warmup_steps=config.warmup_steps or 0)
        self.stopped: HealthSignal | None = None

    @property
    def raised(self) -> dict[DegradedReason, HealthSignal]:
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


class SendCheckpoints(TrainerCallback):
    """Hands each checkpoint this rank wrote to its transfer as soon as the Trainer saved it:
    the rank sends its own files beside training (dpo_trainer.io.checkpoints), and no rank
    waits for another's upload. Times how long each save held training (installed last, it
    sees the step's final decision to save; an evaluation before the save is not counted)."""

    def __init__(self, transfer: CheckpointTransfer) -> None:
        self.transfer = transfer
        self._save_began: float | None = None

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        self._save_began = time.monotonic() if control.should_save else None

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if self._save_began is not None:
            self._save_began = time.monotonic()

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        counted = self.transfer.counted
        if self._save_began is not None:
            held = round(time.monotonic() - self._save_began, 3)
            counted.longest_save_seconds = max(counted.longest_save_seconds, held)
        counted.saves += 1
        self.transfer.saved(f"checkpoint-{state.global_step}")


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


class WatchStragglers(TrainerCallback):
    """At each logging step every rank times the same fixed work (dpo_trainer.train.fabric)
    and names a rank that keeps computing `health.stragglerFactor` times slower than the others
    (Degraded, reason Straggler); rank 0 shows each rank's time on /metrics."""

    def __init__(
        self, me: Identity, device: torch.device, factor: float, metrics: PrometheusCallback
    ) -> None:
        self.me = me
        self.device = device
        self.factor = factor
        self.metrics = metrics
        self.watch = StragglerWatch(factor)
        self.raised: list[HealthSignal] = []
        self.named: set[int] = set()  # ranks already raised, each once
        self.seen: dict[int, list[RankTime]] = {}

    @property
    def by_rank(self) -> list[RankProbe]:
        """Each rank's probes over the run."""
        return [
            RankProbe(
                rank=rank,
                pod=times[0].pod,
                node=times[0].node,
                probes=len(times),
                median_seconds=statistics.median(t.seconds for t in times),
            )
            for rank, times in sorted(self.seen.items())
        ]

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if not dist.is_initialized() or state.global_step % args.logging_steps:
            return
        # Every rank sees every rank's time and judges alike: each pod's summary tells it.
        times = gather_probe(self.me, self.device)
        flagged = self.watch.observe(times)
        for entry in times:
            self.seen.setdefault(entry.rank, []).append(entry)
        for entry, ratio in flagged:
            if entry.rank in self.named:
                continue
            self.named.add(entry.rank)
            message = straggler_message(entry, ratio, self.factor)
            if self.me.rank == 0:
                log.warning("health: Straggler: %s", message)
            self.raised.append(
                HealthSignal(reason="Straggler", step=state.global_step, message=message[:300])
            )
        if self.me.rank == 0:
            self.metrics.set_rank_times(times, flagged)
