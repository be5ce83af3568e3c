"""Live training metrics: a TrainerCallback that serves Prometheus `/metrics` on rank 0.

TRL's logged keys map to the metric names of docs/architecture.md (`rewards/accuracies` ->
`dpo_train_reward_accuracy`, ...); evaluation logs (`eval_*`) go to the same names under
`dpo_eval_`. Every series carries the `dpojob` and `namespace` labels. Other ranks serve
nothing.
"""

from __future__ import annotations

import time
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

from dpo_contract.config import (
    BUS_BANDWIDTH_METRIC,
    DEGRADED_METRIC,
    DEGRADED_REASONS,
    FABRIC_INFO_METRIC,
    PAIR_BANDWIDTH_METRIC,
    RANK_COMPUTE_METRIC,
    STRAGGLER_METRIC,
)
from dpo_contract.intervals import mean_interval
from dpo_contract.reports import FabricReport
from prometheus_client import CollectorRegistry, Gauge, start_http_server
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

if TYPE_CHECKING:
    from dpo_trainer.train.fabric import RankTime

MARGIN_LOW, MARGIN_HIGH = "rewards/margins_low", "rewards/margins_high"
# TRL log key -> metric name suffix, with the help text Prometheus shows.
LOGGED: dict[str, tuple[str, str]] = {
    "loss": ("loss", "DPO loss"),
    "rewards/accuracies": ("reward_accuracy", "Share of pairs whose chosen reward is higher"),
    "rewards/margins": ("reward_margin", "Mean implicit reward margin, chosen minus rejected"),
    "rewards/chosen": ("reward_chosen", "Mean implicit reward of chosen responses"),
    "rewards/rejected": ("reward_rejected", "Mean implicit reward of rejected responses"),
    "logps/chosen": ("logps_chosen", "Mean policy log-probability of chosen responses"),
    "logps/rejected": ("logps_rejected", "Mean policy log-probability of rejected responses"),
    "learning_rate": ("learning_rate", "Current learning rate"),
    # Evaluation only (`margin_interval`): what a sweep stops a clearly worse trial by.
    MARGIN_LOW: ("reward_margin_low", "Lower bound of the held-out mean reward margin"),
    MARGIN_HIGH: ("reward_margin_high", "Upper bound of the held-out mean reward margin"),
}
# Derived from the Trainer's state rather than a logged key.
DERIVED: dict[str, str] = {
    "step": "Optimizer steps done",
    "epoch": "Epochs done (fractional)",
    "tokens_total": "Tokens processed (prompt + responses, all ranks)",
    "tokens_per_second": "Tokens processed per second since the previous log",
    "max_steps": "Optimizer steps the run takes in all",
    "seconds_per_step": "Seconds per optimizer step since the previous log",
}
_HELP = dict(LOGGED.values()) | DERIVED
_EVAL_ONLY = {"reward_margin_low", "reward_margin_high"}
TRAIN_METRICS = [f"dpo_train_{suffix}" for suffix in _HELP if suffix not in _EVAL_ONLY]
# Evaluation logs carry no learning rate and repeat the training token count.
_TRAIN_ONLY = {
    "learning_rate",
    "tokens_total",
    "tokens_per_second",
    "max_steps",
    "seconds_per_step",
}
EVAL_METRICS = [f"dpo_eval_{suffix}" for suffix in _HELP if suffix not in _TRAIN_ONLY]


def margin_interval(batch_margins: list[float], confidence: float) -> dict[str, float]:
    """The held-out mean reward margin's interval at `confidence`, from the mean margin of each
    evaluation batch (TRL keeps one per batch, over every rank): normal, over batch means; none
    from fewer than two batches."""
    if len(batch_margins) < 2:
        return {}
    _, low, high = mean_interval(batch_margins, confidence)
    return {MARGIN_LOW: low, MARGIN_HIGH: high}


LABELS = ("dpojob", "namespace")
RANK_LABELS = ("rank", "pod", "node")
EVAL_PREFIX = "eval_"


class PrometheusCallback(TrainerCallback):
    """Mirrors each log into gauges; serves them on `port` when `serve` (rank 0 only)."""

    def __init__(self, job: str, namespace: str, port: int, *, serve: bool) -> None:
        self.registry = CollectorRegistry()
        self.gauges: dict[str, Any] = {}
        for name in TRAIN_METRICS + EVAL_METRICS:
            suffix = name.removeprefix("dpo_train_").removeprefix("dpo_eval_")
            self.gauges[name] = Gauge(name, _HELP[suffix], LABELS, registry=self.registry)
        self.labels = {"dpojob": job, "namespace": namespace}
        # 1 while a health signal (dpo_trainer.train.health) holds; every reason is there from the
        # start, at 0, so that a dashboard and an alert see the series before anything is wrong.
        self.degraded = Gauge(
            DEGRADED_METRIC,
            "1 while the health signal `reason` holds at the latest log",
            (*LABELS, "reason"),
            registry=self.registry,
        )
        self._holding: dict[str, AbstractSet[str]] = {}
        self.set_degraded(set())
        # Each rank's probe time and the stragglers named (dpo_trainer.train.fabric); the
        # fabric the preflight measured.
        self.rank_compute = Gauge(
            RANK_COMPUTE_METRIC,
            "Seconds of the fixed compute probe on each rank at the latest logging step",
            (*LABELS, *RANK_LABELS),
            registry=self.registry,
        )
        self.straggler = Gauge(
            STRAGGLER_METRIC,
            "A straggling rank's probe time over the median of the others'",
            (*LABELS, *RANK_LABELS),
            registry=self.registry,
        )
        self.fabric_info = Gauge(
            FABRIC_INFO_METRIC,
            "1 for the transport the pods' collectives really ran over",
            (*LABELS, "transport", "gpu_direct_rdma"),
            registry=self.registry,
        )
        self.bus_bandwidth = Gauge(
            BUS_BANDWIDTH_METRIC,
            "Preflight bus bandwidth (GB/s, as nccl-tests computes it) by collective and size",
            (*LABELS, "collective", "bytes"),
            registry=self.registry,
        )
        self.pair_bandwidth = Gauge(
            PAIR_BANDWIDTH_METRIC,
            "Preflight bandwidth (GB/s) between the first processes of two pods",
            (*LABELS, "pods", "nodes"),
            registry=self.registry,
        )
        self.latest: dict[str, float] = {}
        self._last_tokens: tuple[float, float] | None = None
        self._last_step: tuple[int, float] | None = None
        self._server = start_http_server(port, registry=self.registry)[0] if serve else None

    def set(self, name: str, value: float) -> None:
        self.gauges[name].labels(**self.labels).set(value)
        self.latest[name] = value

    def set_degraded(self, reasons: AbstractSet[str], source: str = "health") -> None:
        """The signals of `source` (DPO's health, or the fabric) that hold now."""
        self._holding[source] = reasons
        holding = set().union(*self._holding.values())
        for reason in DEGRADED_REASONS:
            self.degraded.labels(**self.labels, reason=reason).set(1 if reason in holding else 0)

    def set_rank_times(
        self, times: list[RankTime], stragglers: list[tuple[RankTime, float]]
    ) -> None:
        """Each rank's probe and the ratio of each straggler named."""
        self.rank_compute.clear()
        self.straggler.clear()
        for entry in times:
            self.rank_compute.labels(**self.labels, **entry.labels).set(entry.seconds)
        for entry, ratio in stragglers:
            self.straggler.labels(**self.labels, **entry.labels).set(ratio)
        self.set_degraded({"Straggler"} if stragglers else set(), source="stragglers")

    def set_fabric(self, report: FabricReport) -> None:
        summary = report.summary()
        self.fabric_info.labels(
            **self.labels,
            transport=summary.transport,
            gpu_direct_rdma=str(summary.gpu_direct_rdma).lower(),
        ).set(1)
        if report.preflight is None:
            return
        for measured in report.preflight.collectives:
            self.bus_bandwidth.labels(
                **self.labels, collective=measured.collective, bytes=str(measured.bytes)
            ).set(measured.bus_gbps)
        for pair in report.preflight.pairs:
            self.pair_bandwidth.labels(
                **self.labels, pods=",".join(pair.pods), nodes=",".join(pair.nodes)
            ).set(pair.gbps)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or not state.is_world_process_zero:
            return
        phase = "eval" if any(key.startswith(EVAL_PREFIX) for key in logs) else "train"
        if phase == "train" and "loss" not in logs:
            return  # the end-of-training summary (train_runtime, ...), not a step log
        prefix = EVAL_PREFIX if phase == "eval" else ""
        for key, (suffix, _) in LOGGED.items():
            value = logs.get(prefix + key)
            if isinstance(value, int | float):
                self.set(f"dpo_{phase}_{suffix}", float(value))
        self.set(f"dpo_{phase}_step", float(state.global_step))
        if state.epoch is not None:
            self.set(f"dpo_{phase}_epoch", float(state.epoch))
        tokens = logs.get("num_tokens")
        if phase == "train" and isinstance(tokens, int | float):
            self._count_tokens(float(tokens))
        if phase == "train":
            self._time_steps(state.global_step)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if state.is_world_process_zero:
            self.set("dpo_train_max_steps", float(state.max_steps))

    def _time_steps(self, step: int) -> None:
        """Seconds per step between logs (a resumed run starts timing at its first log)."""
        now = time.monotonic()
        if self._last_step is not None:
            last_step, last_time = self._last_step
            if step > last_step:
                self.set("dpo_train_seconds_per_step", (now - last_time) / (step - last_step))
        self._last_step = (step, now)

    def _count_tokens(self, tokens: float) -> None:
        now = time.monotonic()
        self.set("dpo_train_tokens_total", tokens)
        if self._last_tokens is not None:
            last_tokens, last_time = self._last_tokens
            if now > last_time and tokens >= last_tokens:
                self.set("dpo_train_tokens_per_second", (tokens - last_tokens) / (now - last_time))
        self._last_tokens = (tokens, now)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
