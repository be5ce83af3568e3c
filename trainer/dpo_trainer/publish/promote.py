"""Promotion: check that the run's adapter is the one its gate passed, then publish it to the
target (`target_for` picks the backend). Nothing is promoted without an eval.json that passed
for the same adapter digest; promoting the same adapter again changes nothing."""

from __future__ import annotations

import logging

from dpo_contract.config import TrainerConfig
from dpo_contract.manifest import verify_manifest
from dpo_contract.pod import BadInputError
from dpo_contract.reports import GateReport, PromotionResult

from dpo_trainer.io.artifacts import ADAPTER, EVAL_REPORT, Artifacts
from dpo_trainer.publish.target import Publication
from dpo_trainer.publish.targets import target_for

log = logging.getLogger(__name__)


def version_name(job: str, digest: str) -> str:
    """Deterministic: the same adapter always gets the same version, so re-runs change nothing."""
    return f"{job}-{digest.removeprefix('sha256:')[:12]}"


def promote(config: TrainerConfig) -> PromotionResult:
    """Promote the run's adapter; returns the `current` pointer it leaves."""
    if config.promotion is None:
        raise BadInputError("trainer.json has no promotion: set spec.promotion.target")
    artifacts = Artifacts(config.artifacts_dir)
    adapter = artifacts.fetch(ADAPTER)
    digest = verify_manifest(adapter)
    report = artifacts.read_report(EVAL_REPORT, GateReport)
    if report is None:
        raise BadInputError(f"{artifacts.uri}: no {EVAL_REPORT}; the eval gate must pass first")
    if report.adapter_digest != digest:
        raise BadInputError(
            f"{EVAL_REPORT} is for adapter {report.adapter_digest}, not {digest}: the "
            "adapter changed after the gate; run the gate again"
        )
    if report.verdict != "Passed":
        raise BadInputError(f"the gate rejected adapter {digest}; it cannot be promoted")
    publication = Publication(
        adapter=adapter,
        adapter_digest=digest,
        version=version_name(config.job.name, digest),
        served_model_name=config.promotion.served_model_name,
        report=report,
        job=config.job,
    )
    pointer = target_for(config.promotion).publish(publication)
    log.info("promoted %s to %s", digest, pointer.uri)
    return pointer
