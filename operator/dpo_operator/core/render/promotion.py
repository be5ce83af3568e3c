"""The promote Job: one CPU pod that publishes the gated adapter."""

from __future__ import annotations

from dpo_contract.pod import EXIT_BAD_INPUT, EXIT_CHAMPION_CHANGED, EXIT_WRONG_ENVIRONMENT

from dpo_operator.core.names import promote_job_name
from dpo_operator.core.render.manifest import Manifest
from dpo_operator.core.render.pod import single_pod_job
from dpo_operator.core.resolve import ResolvedJob


def render_promote_job(resolved: ResolvedJob, attempt: int) -> Manifest:
    """Copies the gated adapter to the promotion target; needs no GPU."""
    return single_pod_job(
        resolved,
        promote_job_name(resolved.job, attempt),
        "promote",
        attempt,
        0,
        "500m",
        "2Gi",
        [EXIT_BAD_INPUT, EXIT_WRONG_ENVIRONMENT, EXIT_CHAMPION_CHANGED],
    )
