"""Promotion: publish a gated adapter to `<target>/versions/<version>/`, then switch `current`.

The adapter is copied and its digests verified before `<target>/current` (a small JSON pointer)
is replaced in one step (rename on a filesystem, a single object write on an object store), so
a reader never sees a half-promoted adapter. Nothing is promoted without an eval.json that
passed for the same adapter digest. Promoting the same adapter again changes nothing, and
promotions racing to one target each leave `current` pointing at a complete version.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from dpo_trainer.artifacts import ADAPTER, EVAL_REPORT, MANIFEST, Artifacts, verify_manifest
from dpo_trainer.config import BadInputError, GateReport, PromotionResult, TrainerConfig

log = logging.getLogger(__name__)

CURRENT = "current"
VERSIONS = "versions"


def version_name(job: str, digest: str) -> str:
    """Deterministic: the same adapter always gets the same version, so re-runs change nothing."""
    return f"{job}-{digest.removeprefix('sha256:')[:12]}"


def read_current(target: str) -> PromotionResult | None:
    """What `<target>/current` points at, or None when nothing was promoted there."""
    fs, root = fsspec.core.url_to_fs(target)
    pointer = f"{root}/{CURRENT}"
    if not fs.exists(pointer):
        return None
    return PromotionResult.model_validate_json(fs.cat_file(pointer))


def promoted_adapter(target: str) -> tuple[Path, str] | None:
    """The currently promoted adapter as a local directory, with its digest; None if none."""
    current = read_current(target)
    if current is None:
        return None
    fs, root = fsspec.core.url_to_fs(target)
    version = f"{root}/{VERSIONS}/{current.version}"
    if isinstance(fs, LocalFileSystem):
        return Path(version), current.digest
    local = Path(tempfile.mkdtemp(prefix="dpo-promoted-"))
    fs.get(version, str(local), recursive=True)
    return local, current.digest


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

    target = config.promotion.target
    current = read_current(target)
    if current is not None and current.digest == digest:
        log.info("%s already points at %s: nothing to do", target, current.version)
        return current

    fs, root = fsspec.core.url_to_fs(target)
    version = version_name(config.job.name, digest)
    destination = f"{root}/{VERSIONS}/{version}"
    if isinstance(fs, LocalFileSystem):
        _copy_local(adapter, Path(destination), digest)
    else:
        _copy_remote(fs, adapter, destination, digest)
    pointer = PromotionResult(
        version=version,
        digest=digest,
        uri=f"{target.rstrip('/')}/{VERSIONS}/{version}",
        promoted_at=datetime.now(UTC).isoformat(timespec="seconds"),
        job=config.job,
    )
    _write_pointer(fs, root, pointer)
    log.info("promoted %s to %s", digest, pointer.uri)
    return pointer


def _copy_local(adapter: Path, destination: Path, digest: str) -> None:
    if (destination / MANIFEST).exists() and verify_manifest(destination) == digest:
        return  # an earlier or concurrent promotion of the same adapter finished the copy
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".staging-{uuid.uuid4().hex}"
    shutil.copytree(adapter, staging)
    if verify_manifest(staging) != digest:
        raise BadInputError(f"{staging}: the copy does not match the adapter's manifest")
    try:
        staging.rename(destination)
    except OSError:
        # Someone else renamed the same version into place first; theirs must be complete.
        shutil.rmtree(staging, ignore_errors=True)
        if verify_manifest(destination) != digest:
            raise
    log.info("copied and verified %s", destination)


def _copy_remote(fs: Any, adapter: Path, destination: str, digest: str) -> None:
    fs.put(str(adapter), destination, recursive=True)
    check = Path(tempfile.mkdtemp(prefix="dpo-verify-"))
    try:
        fs.get(destination, str(check), recursive=True)
        if verify_manifest(check) != digest:
            raise BadInputError(f"{destination}: the uploaded copy does not match the manifest")
    finally:
        shutil.rmtree(check, ignore_errors=True)


def _write_pointer(fs: Any, root: str, pointer: PromotionResult) -> None:
    content = (pointer.model_dump_json(by_alias=True, indent=2) + "\n").encode()
    path = f"{root}/{CURRENT}"
    if isinstance(fs, LocalFileSystem):
        staging = f"{path}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        Path(staging).write_bytes(content)
        os.replace(staging, path)  # atomic: readers see the old pointer or the new one
    else:
        fs.pipe_file(path, content)  # one object write: atomic on object stores
