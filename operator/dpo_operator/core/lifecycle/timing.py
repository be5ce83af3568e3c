"""Time in the lifecycle: how long a run has been active (its suspensions not counted), when
time itself next changes something for it, and how long its training has left."""

from __future__ import annotations

from datetime import datetime, timedelta

from dpo_operator.api import (
    TERMINAL_PHASES,
    DPOJob,
    DPOJobStatus,
    ProgressStatus,
    TrainingMetrics,
)


def active_seconds(status: DPOJobStatus, now: datetime) -> float | None:
    """Seconds since the run started, less the time it spent suspended; None before it
    started."""
    if status.start_time is None:
        return None
    suspended = status.suspended_seconds
    if status.suspended_at is not None:
        suspended += (now - status.suspended_at).total_seconds()
    return (now - status.start_time).total_seconds() - suspended


def requeue_after(job: DPOJob, status: DPOJobStatus, now: datetime) -> float | None:
    """Seconds until time itself changes something for `job` in `status`: its next metrics
    scrape while it trains, its deadline, its startup timeout, the end of its TTL; None when
    nothing is due."""
    times: list[float] = []
    policy = job.spec.run_policy
    if status.phase == "Training":
        times.append(float(job.spec.monitoring.interval_seconds))
    running = status.phase not in TERMINAL_PHASES
    active = active_seconds(status, now)
    if policy.active_deadline_seconds is not None and active is not None and running:
        times.append(policy.active_deadline_seconds - active + 0.5)
    if status.waiting_since is not None and running:
        waited = (now - status.waiting_since).total_seconds()
        times.append(policy.startup_timeout_seconds - waited + 0.5)
    ttl = policy.ttl_seconds_after_finished
    if ttl is not None and status.completion_time is not None and not status.children_deleted:
        times.append((status.completion_time + timedelta(seconds=ttl) - now).total_seconds())
    return min(times) if times else None


def progress(metrics: TrainingMetrics) -> ProgressStatus | None:
    """Percent done and the time left at the pace rank 0 measured; None before it says."""
    if metrics.step is None or not metrics.max_steps:
        return None
    percent = min(100.0, 100.0 * metrics.step / metrics.max_steps)
    eta = None
    if metrics.seconds_per_step is not None:
        eta = round(max(metrics.max_steps - metrics.step, 0) * metrics.seconds_per_step)
    summary = f"{percent:.0f}%" + (f" ETA {_duration(eta)}" if eta is not None else "")
    return ProgressStatus(percent=round(percent, 1), eta_seconds=eta, summary=summary)


def _duration(seconds: int) -> str:
    """3h05m, 12m40s, 9s."""
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
