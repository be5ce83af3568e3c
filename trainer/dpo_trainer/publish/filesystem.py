"""A filesystem target (a PVC, NFS): versions are copied and renamed into place, and the pointer
is swapped by an atomic rename under a POSIX lock, which NFS shares between pods."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from dpo_contract.manifest import MANIFEST, verify_manifest
from dpo_contract.pod import BadInputError
from dpo_contract.reports import PromotionResult

from dpo_trainer.publish.pointer import CURRENT, PointerTarget, pointer_bytes

log = logging.getLogger(__name__)

LOCK = ".promote.lock"


class FilesystemTarget(PointerTarget):
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        Path(self.root).mkdir(parents=True, exist_ok=True)
        with open(Path(self.root) / LOCK, "a+b") as lock:
            fcntl.lockf(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(lock, fcntl.LOCK_UN)

    def copy(self, adapter: Path, destination: str, digest: str) -> None:
        target = Path(destination)
        if (target / MANIFEST).exists() and verify_manifest(target) == digest:
            return  # an earlier or concurrent promotion of the same adapter finished the copy
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".staging-{uuid.uuid4().hex}"
        shutil.copytree(adapter, staging)
        if verify_manifest(staging) != digest:
            raise BadInputError(f"{staging}: the copy does not match the adapter's manifest")
        try:
            staging.rename(target)
        except OSError:
            # Someone else renamed the same version into place first; theirs must be complete.
            shutil.rmtree(staging, ignore_errors=True)
            if verify_manifest(target) != digest:
                raise
        log.info("copied and verified %s", target)

    def write_pointer(self, pointer: PromotionResult, tag: str | None) -> None:
        # The lock makes the compare and this write one step: no condition to check here.
        del tag
        path = f"{self.root}/{CURRENT}"
        staging = f"{path}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        Path(staging).write_bytes(pointer_bytes(pointer))
        os.replace(staging, path)  # atomic: readers see the old pointer or the new one
