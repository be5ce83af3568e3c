"""Each kind of promotion target, by its URI: a filesystem, an object store, or an OCI
repository; and what `current` names on the targets that keep one."""

from __future__ import annotations

import tempfile
from pathlib import Path

import fsspec
from dpo_contract.config import PromotionConfig
from dpo_contract.manifest import verify_manifest
from dpo_contract.oci import is_oci
from dpo_contract.pod import BadInputError
from dpo_contract.reports import PromotionResult
from fsspec.implementations.local import LocalFileSystem

from dpo_trainer.io.artifacts import download_folder
from dpo_trainer.publish.filesystem import FilesystemTarget
from dpo_trainer.publish.object_store import ObjectStoreTarget
from dpo_trainer.publish.oci import OciTarget
from dpo_trainer.publish.pointer import CURRENT, VERSIONS, PointerTarget
from dpo_trainer.publish.target import PromotionTarget


def target_for(config: PromotionConfig) -> PromotionTarget:
    """The backend of `config.target`'s kind."""
    if is_oci(config.target):
        return OciTarget(config.target, plain_http=config.plain_http)
    return pointer_target(config.target)


def pointer_target(target: str) -> PointerTarget:
    fs, root = fsspec.core.url_to_fs(target)
    kind = FilesystemTarget if isinstance(fs, LocalFileSystem) else ObjectStoreTarget
    return kind(target, fs, root)


def read_current(target: str) -> PromotionResult | None:
    """What `<target>/current` points at, or None when nothing was promoted there."""
    return pointer_target(target).pointer_and_tag()[0]


def promoted_adapter(target: str) -> tuple[Path, str] | None:
    """The currently promoted adapter as a local directory whose files match the digest
    `current` records, with that digest; None if none was promoted."""
    where = pointer_target(target)
    current = where.pointer_and_tag()[0]
    if current is None:
        return None
    version = f"{where.root}/{VERSIONS}/{current.version}"
    local = Path(version)
    if not isinstance(where.fs, LocalFileSystem):
        local = Path(tempfile.mkdtemp(prefix="dpo-promoted-")) / current.version
        download_folder(where.fs, version, local)
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
