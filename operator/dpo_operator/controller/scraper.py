"""Reads rank 0's /metrics into the status's training metrics."""

from __future__ import annotations

import logging
import math
import time
import urllib.request
from datetime import UTC, datetime

from dpo_contract.config import DEGRADED_METRIC, HEALTH_REASONS, HealthReason
from prometheus_client.parser import text_string_to_metric_families

from dpo_operator.api import DPOJob, TrainingMetrics

log = logging.getLogger("dpo_operator")

SCRAPE_TIMEOUT = 3.0  # for the whole page, not per read
SCRAPE_MAX_BYTES = 1 << 20  # rank 0's page is a few KiB


def scrape(job: DPOJob, pod_ip: str) -> TrainingMetrics | None:
    """Rank 0's latest step, loss, reward accuracy and margin; None when it cannot say.

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
                    return None
                chunks.append(chunk)
        text = b"".join(chunks).decode(errors="replace")
        families = list(text_string_to_metric_families(text))
    except (OSError, ValueError) as error:  # unreachable, or not the exposition format
        log.debug("[%s/%s] no metrics at %s: %s", job.namespace, job.name, url, error)
        return None
    values: dict[str, float] = {}
    degraded: list[HealthReason] = []
    for family in families:
        for sample in family.samples:
            if sample.labels.get("dpojob") != job.name or not math.isfinite(sample.value):
                continue
            if sample.name == DEGRADED_METRIC:
                reason = sample.labels.get("reason")
                if sample.value == 1 and reason in HEALTH_REASONS:
                    degraded.append(reason)
            else:
                values[sample.name] = sample.value
    if "dpo_train_step" not in values:
        return None
    return TrainingMetrics(
        step=int(values["dpo_train_step"]),
        loss=values.get("dpo_train_loss"),
        reward_accuracy=values.get("dpo_train_reward_accuracy"),
        reward_margin=values.get("dpo_train_reward_margin"),
        degraded=sorted(degraded, key=HEALTH_REASONS.index),
        updated_at=datetime.now(UTC),
    )


def scrape_due(job: DPOJob, now: datetime) -> bool:
    current = job.status.metrics if job.status else None
    if current is None or current.updated_at is None:
        return True
    elapsed = (now - current.updated_at).total_seconds()
    return elapsed >= job.spec.monitoring.interval_seconds
