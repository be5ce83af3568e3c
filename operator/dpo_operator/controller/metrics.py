"""The operator's own Prometheus metrics: DPOJobs by phase, reconciles, restarts, gate verdicts
and promotions, and which DPOJob is which trial of which DPOSweep.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram

from dpo_operator.api import PHASES
from dpo_operator.controller.cache import Key

DPOJOBS = Gauge("dpo_operator_dpojobs", "DPOJobs by phase", ["phase"])
RECONCILE_SECONDS = Histogram("dpo_operator_reconcile_seconds", "Time of one reconcile")
RECONCILE_ERRORS = Counter("dpo_operator_reconcile_errors_total", "Reconciles that failed")
RESTARTS = Counter("dpo_operator_restarts_total", "Training pod groups restarted")
GATE_VERDICTS = Counter("dpo_operator_gate_verdicts_total", "Eval gate verdicts", ["verdict"])
PROMOTIONS = Counter("dpo_operator_promotions_total", "Adapters promoted")
# An info metric (value 1): a dashboard joins the trainers' series to it on namespace and dpojob
# to draw a sweep's trials by trial and settings.
SWEEP_TRIALS = Gauge(
    "dpo_operator_sweep_trial_info",
    "1 for each trial of a DPOSweep (join on namespace and dpojob)",
    ["namespace", "sweep", "trial", "dpojob", "settings"],
)
SweepSeries = tuple[str, str, str, str, str]
for _verdict in ("Passed", "Rejected"):
    # Exported at 0 from the start, so increase() sees the first verdict as a rise.
    GATE_VERDICTS.labels(verdict=_verdict)

# Events that also move an operator counter.
COUNTED_EVENTS = {
    "Restarting": lambda: RESTARTS.inc(),
    "GatePassed": lambda: GATE_VERDICTS.labels(verdict="Passed").inc(),
    "GateRejected": lambda: GATE_VERDICTS.labels(verdict="Rejected").inc(),
    "Promoted": lambda: PROMOTIONS.inc(),
}


def export_phases(phases: Mapping[Key, str]) -> None:
    counts = dict.fromkeys(PHASES, 0)
    for phase in phases.values():
        counts[phase] += 1
    for phase, count in counts.items():
        DPOJOBS.labels(phase=phase).set(count)


def export_sweep_trials(
    exported: dict[Key, list[SweepSeries]], key: Key, series: list[SweepSeries]
) -> None:
    """The trials of the sweep `key` (none: it is gone), replacing what was exported for it."""
    for old in exported.pop(key, []):
        if old not in series:
            SWEEP_TRIALS.remove(*old)
    for labels in series:
        SWEEP_TRIALS.labels(*labels).set(1)
    if series:
        exported[key] = series
