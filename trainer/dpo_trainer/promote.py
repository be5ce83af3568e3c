"""Promotion: publish a gated adapter to `<target>/versions/<version>/`, then switch `current`.

The adapter is copied and its digests verified before `<target>/current` (a small JSON pointer)
is replaced in one step (rename on a filesystem, a single object write on an object store), so
a reader never sees a half-promoted adapter. Nothing is promoted without an eval.json that
passed for the same adapter digest. Promoting the same adapter again changes nothing, and
promotions racing to one target each leave `current` pointing at a complete version.

A gate that had to beat the promoted adapter names the one it beat: the pointer is switched
only if it still points there, so of two runs that beat the same champion at once the second
fails with ChampionChangedError instead of replacing a possibly better adapter. The compare and
the swap are one step: under a POSIX lock on a filesystem target, and on S3 a conditional write
(`If-Match` the ETag of the pointer that was compared, `If-None-Match: *` when there was none)
that the store refuses once another run wrote the pointer. Other object stores have no such
write here, so the API refuses `mustBeatPromoted` with them. A promoted adapter is only ever
read back after its digests were checked.
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

from dpo_trainer.artifacts import ADAPTER, EVAL_REPORT, Artifacts, download_folder, upload_folder
from dpo_trainer.config import (
    BadInputError,
    ChampionChangedError,
    GateReport,
    PromotionResult,
    TrainerConfig,
)
from dpo_trainer.manifest import MANIFEST, verify_manifest
from dpo_trainer.oci import AdapterPush, is_oci, push_adapter

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
    return _pointer_and_tag(fs, root)[0]


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
        local = Path(tempfile.mkdtemp(prefix="dpo-promoted-")) / current.version
        download_folder(fs, version, local)
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
    version = version_name(config.job.name, digest)
    if is_oci(target):
        push = AdapterPush(
            adapter=adapter,
            adapter_digest=digest,
            version=version,
            served_model_name=config.promotion.served_model_name,
            report=report,
            job=config.job,
        )
        pointer = push_adapter(target, push, plain_http=config.promotion.plain_http)
        log.info("promoted %s to %s", digest, pointer.uri)
        return pointer
    current = read_current(target)
    if current is not None and current.digest == digest:
        log.info("%s already points at %s: nothing to do", target, current.version)
        return current

    fs, root = fsspec.core.url_to_fs(target)
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
        if report.champion_digest is None:
            _write_pointer(fs, root, pointer, _ANY)
        else:
            now, tag = _pointer_and_tag(fs, root)
            try:
                if (now.digest if now else "") != report.champion_digest:
                    raise _PointerChangedError(target)
                _write_pointer(fs, root, pointer, tag)
            except _PointerChangedError:
                now = _pointer_and_tag(fs, root)[0]
                if now is not None and now.digest == digest:
                    log.info("%s was promoted meanwhile by a repeat of this run", digest)
                    return now
                raise _champion_changed(report.champion_digest, target, now) from None
    log.info("promoted %s to %s", digest, pointer.uri)
    return pointer


def _champion_changed(
    champion: str, target: str, now: PromotionResult | None
) -> ChampionChangedError:
    return ChampionChangedError(
        f"the gate beat {champion or 'no promoted adapter'}, but {target}/{CURRENT} now points "
        f"at {now.version if now else 'nothing'} ({now.digest if now else 'none'}), promoted "
        "meanwhile by another run: this adapter was not promoted; run it again to be gated "
        "against the new one"
    )


# The pointer write's condition: replace whatever is there.
_ANY = "*any*"


class _PointerChangedError(Exception):
    """`current` no longer names the champion the gate beat: another run wrote it first (seen
    by the compare, or by the store refusing the conditional write)."""


def _pointer_and_tag(fs: Any, root: str) -> tuple[PromotionResult | None, str | None]:
    """`current` and the tag a conditional write of it must match (its S3 ETag; None when
    there is no pointer, or the store writes unconditionally). The tag is read first: a
    pointer replaced in between makes the write fail rather than succeed on a stale compare."""
    path = f"{root}/{CURRENT}"
    tag = None
    if _writes_conditionally(fs):
        try:
            tag = str(fs.info(path, refresh=True)["ETag"])
        except FileNotFoundError:
            return None, None
    elif not fs.exists(path):
        return None, None
    return PromotionResult.model_validate_json(fs.cat_file(path)), tag


@contextlib.contextmanager
def _locked(fs: Any, root: str) -> Iterator[None]:
    """Holds the target's lock on a filesystem (a POSIX lock: NFS shares it between pods).
    An object store has no lock: on S3 the pointer write is conditional instead."""
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
    upload_folder(fs, adapter, destination)
    check = Path(tempfile.mkdtemp(prefix="dpo-verify-"))
    try:
        download_folder(fs, destination, check)
        if verify_manifest(check) != digest:
            raise BadInputError(f"{destination}: the uploaded copy does not match the manifest")
    finally:
        shutil.rmtree(check, ignore_errors=True)


def _writes_conditionally(fs: Any) -> bool:
    return "s3" in fs.protocol


def _write_pointer(fs: Any, root: str, pointer: PromotionResult, tag: str | None) -> None:
    """Replace `current` in one step. `tag` is the condition: `_ANY`, None (there must be no
    pointer) or the ETag the pointer must still have (S3 only; a filesystem target is locked)."""
    content = (pointer.model_dump_json(by_alias=True, indent=2) + "\n").encode()
    path = f"{root}/{CURRENT}"
    if isinstance(fs, LocalFileSystem):
        staging = f"{path}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        Path(staging).write_bytes(content)
        os.replace(staging, path)  # atomic: readers see the old pointer or the new one
    elif tag == _ANY or not _writes_conditionally(fs):
        fs.pipe_file(path, content)  # one object write: atomic on object stores
    else:
        condition = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}
        try:
            fs.pipe_file(path, content, **condition)
        except OSError as error:
            if _is_precondition_failed(error):
                raise _PointerChangedError(path) from error
            raise


def _is_precondition_failed(error: BaseException) -> bool:
    """Whether S3 answered 412 PreconditionFailed (s3fs wraps botocore's error)."""
    cause: BaseException | None = error
    while cause is not None:
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "PreconditionFailed" or status == 412:
                return True
        cause = cause.__cause__ or cause.__context__
    return False
