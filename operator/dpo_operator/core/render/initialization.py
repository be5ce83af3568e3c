"""The model initializer's Job: one CPU pod from the trainer image that resolves the model with
the run's own credentials, counts it on the meta device and stages it (`dpo-trainer init`)."""

from __future__ import annotations

from dpo_contract.pod import EXIT_BAD_INPUT

from dpo_operator.core.names import init_job_name
from dpo_operator.core.render.manifest import Manifest
from dpo_operator.core.render.pod import single_pod_job
from dpo_operator.core.resolve import ResolvedJob

# Building a model on the meta device takes little memory whatever its size (the largest config
# builds in under a GiB); a download streams through in ranges.
INIT_CPU = "1"
INIT_MEMORY = "4Gi"


def render_init_job(resolved: ResolvedJob, attempt: int) -> Manifest:
    """The initializer (`attempt` is the first training attempt's: it runs once per run)."""
    return single_pod_job(
        resolved,
        init_job_name(resolved.job),
        "init",
        attempt,
        0,
        INIT_CPU,
        INIT_MEMORY,
        [EXIT_BAD_INPUT],
    )
