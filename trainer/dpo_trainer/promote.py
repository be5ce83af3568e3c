"""Promotion: publish a gated adapter to `<target>/versions/<version>/`, then switch `current`.

The adapter is copied and its digests verified before `<target>/current` (a small JSON pointer)
is replaced in one step (rename on a filesystem, a single object write on an object store), so
a reader never sees a half-promoted adapter. Nothing is promoted without an eval.json that
passed for the same adapter digest. Promoting the same adapter again changes nothing, and
promotions racing to one target each leave `current` pointing at a complete version.

A gate that had to beat the promoted adapter names the one it beat: the pointer is switched
only if it still points there (compare and swap, under a lock on a filesystem target), so of
two runs that beat the same champion at once the second fails with ChampionChangedError
instead of replacing a possibly better adapter. A promoted adapter is only ever read back
after its digests were checked.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from dpo_trainer.artifacts import ADAPTER, EVAL_REPORT, MANIFEST, Artifacts, verify_manifest
from dpo_trainer.config import (
    BadInputError,
    ChampionChangedError,
    GateReport,
    PromotionResult,
    TrainerConfig,
)

log = logging.getLogger(__name__)

CURRENT = "current"
VERSIONS = "versions"
LOCK = ".promote.lock"


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
    """The currently promoted adapter as a local directory whose files match the digest
    `current` records, with that digest; None if none was promoted."""
    current = read_current(target)
    if current is None:
        return None
    fs, root = fsspec.core.url_to_fs(target)
    version = f"{root}/{VERSIONS}/{current.version}"
    local = Path(version)
    if not isinstance(fs, LocalFileSystem):
        local = Path(tempfile.mkdtemp(prefix="dpo-promoted-"))
        fs.get(version, str(local), recursive=True)
    try:
        found = verify_manifest(local)
    except BadInputError as error:
        raise BadInputError(f"the promoted adapter at {version} is damaged: {error}") from error
    if found != current.digest:
        raise BadInputError(
            f"the promoted adapter at {version} has digest {found}, but {target}/{CURRENT} "
            f"records {current.digest}: it was changed after promotion; restore it or promote "
            "again without evalGate.mustBeatPromoted"
        )
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
    with _locked(fs, root):
        if report.champion_digest is not None:
            now = read_current(target)
            if (now.digest if now else "") != report.champion_digest:
                raise ChampionChangedError(
                    f"the gate beat {report.champion_digest or 'no promoted adapter'}, but "
                    f"{target}/{CURRENT} now points at {now.version if now else 'nothing'} "
                    f"({now.digest if now else 'none'}), promoted meanwhile by another run: "
                    "this adapter was not promoted; run it again to be gated against the new "
                    "one"
                )
        _write_pointer(fs, root, pointer)
    log.info("promoted %s to %s", digest, pointer.uri)
    return pointer


@contextlib.contextmanager
def _locked(fs: Any, root: str) -> Iterator[None]:
    """Holds the target's lock on a filesystem (a POSIX lock: NFS shares it between pods).
    An object store has no lock: its single pointer write is still atomic, and the compare
    before it narrows a race to that one write."""
    if not isinstance(fs, LocalFileSystem):
        yield
        return
    Path(root).mkdir(parents=True, exist_ok=True)
    with open(Path(root) / LOCK, "a+b") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(lock, fcntl.LOCK_UN)


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
