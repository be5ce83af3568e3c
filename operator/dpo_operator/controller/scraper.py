"""Reads rank 0's /metrics into the status's training metrics."""

from __future__ import annotations

import logging
import math
import time
import urllib.request
from datetime import UTC, datetime

from dpo_contract.config import (
    BUS_BANDWIDTH_METRIC,
    DEGRADED_METRIC,
    DEGRADED_REASONS,
    FABRIC_INFO_METRIC,
    PAIR_BANDWIDTH_METRIC,
    STRAGGLER_METRIC,
    DegradedReason,
)
from dpo_contract.reports import FabricSummary, pair_text, straggler_text
from prometheus_client.parser import text_string_to_metric_families

from dpo_operator.api import DPOJob, TrainingMetrics

log = logging.getLogger("dpo_operator")

SCRAPE_TIMEOUT = 3.0  # for the whole page, not per read
SCRAPE_MAX_BYTES = 1 << 20  # rank 0's page is a few KiB


def scrape(job: DPOJob, pod_ip: str) -> tuple[TrainingMetrics | None, FabricSummary | None]:
    """Rank 0's latest step, loss, reward accuracy and margin, and the fabric it measured; None
    for what it cannot say yet.

    Rank 0 is the user's code: a page that never ends, or never stops coming, or says NaN,
    must not hang a worker, fill the operator's memory or poison the status patch."""
    url = f"http://{pod_ip}:{job.spec.monitoring.port}/metrics"
    deadline = time.monotonic() + SCRAPE_TIMEOUT
    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as response:
            chunks: list[bytes] = []
            size = 0
            while chunk := response.read(64 * 1024):
                size += len(chunk)
                if size > SCRAPE_MAX_BYTES or time.monotonic() > deadline:
                    log.warning(
                        "[%s/%s] %s is over %d bytes or %.0fs; not read",
                        job.namespace,
                        job.name,
                        url,
                        SCRAPE_MAX_BYTES,
                        SCRAPE_TIMEOUT,
                    )
                    return None, None
                chunks.append(chunk)
        text = b"".join(chunks).decode(errors="replace")
        families = list(text_string_to_metric_families(text))
    except (OSError, ValueError) as error:  # unreachable, or not the exposition format
        log.debug("[%s/%s] no metrics at %s: %s", job.namespace, job.name, url, error)
        return None, None
    values: dict[str, float] = {}
    degraded: list[DegradedReason] = []
    series: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in families:
        for sample in family.samples:
            if sample.labels.get("dpojob") != job.name or not math.isfinite(sample.value):
                continue
            if sample.name == DEGRADED_METRIC:
                reason = sample.labels.get("reason")
                if sample.value == 1 and reason in DEGRADED_REASONS:
                    degraded.append(reason)
            else:
                values[sample.name] = sample.value
                series.setdefault(sample.name, []).append((sample.labels, sample.value))
    fabric = _fabric(series)
    if "dpo_train_step" not in values:
        return None, fabric
    return TrainingMetrics(
        step=int(values["dpo_train_step"]),
        loss=values.get("dpo_train_loss"),
        reward_accuracy=values.get("dpo_train_reward_accuracy"),
        reward_margin=values.get("dpo_train_reward_margin"),
        eval_step=int(values["dpo_eval_step"]) if "dpo_eval_step" in values else None,
        eval_reward_margin=values.get("dpo_eval_reward_margin"),
        eval_reward_margin_low=values.get("dpo_eval_reward_margin_low"),
        eval_reward_margin_high=values.get("dpo_eval_reward_margin_high"),
        degraded=sorted(degraded, key=DEGRADED_REASONS.index),
        max_steps=int(values["dpo_train_max_steps"]) if "dpo_train_max_steps" in values else None,
        seconds_per_step=values.get("dpo_train_seconds_per_step"),
        straggler=_straggler(series.get(STRAGGLER_METRIC, [])),
        updated_at=datetime.now(UTC),
    ), fabric


def _fabric(series: dict[str, list[tuple[dict[str, str], float]]]) -> FabricSummary | None:
    info = series.get(FABRIC_INFO_METRIC)
    if not info:
        return None
    labels, _ = info[0]
    sweep = [
        (int(s["bytes"]), v)
        for s, v in series.get(BUS_BANDWIDTH_METRIC, [])
        if s.get("collective") == "all_reduce" and s.get("bytes", "").isdigit()
    ]
    pairs = series.get(PAIR_BANDWIDTH_METRIC, [])
    slowest = min(pairs, key=lambda pair: pair[1]) if pairs else None
    return FabricSummary(
        transport=labels.get("transport", "")[:64],
        gpu_direct_rdma=labels.get("gpu_direct_rdma") == "true",
        bus_bandwidth_gbps=max(sweep)[1] if sweep else None,
        slowest_pair=(
            pair_text(
                slowest[0].get("pods", "").split(","),
                slowest[0].get("nodes", "").split(","),
                slowest[1],
            )[:512]
            if slowest
            else None
        ),
    )


def _straggler(samples: list[tuple[dict[str, str], float]]) -> str | None:
    if not samples:
        return None
    labels, ratio = max(samples, key=lambda sample: sample[1])
    text = straggler_text(labels.get("rank"), labels.get("pod", ""), labels.get("node", ""), ratio)
    return text[:1024]


def scrape_due(job: DPOJob, now: datetime) -> bool:
    current = job.status.metrics if job.status else None
    if current is None or current.updated_at is None:
        return True
    elapsed = (now - current.updated_at).total_seconds()
    return elapsed >= job.spec.monitoring.interval_seconds
