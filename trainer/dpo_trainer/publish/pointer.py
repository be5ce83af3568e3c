"""Targets laid out as `<target>/versions/<version>/` and a `current` pointer: a filesystem or an
object store, both reached through fsspec.

The adapter is copied and its digests verified before `<target>/current` (a small JSON pointer)
is replaced in one step (rename on a filesystem, a single object write on an object store), so
a reader never sees a half-promoted adapter. Promotions racing to one target each leave
`current` pointing at a complete version.

A gate that had to beat the promoted adapter names the one it beat: the pointer is switched
only if it still points there, so of two runs that beat the same champion at once the second
fails with ChampionChangedError instead of replacing a possibly better adapter. The compare and
the swap are one step: under a POSIX lock on a filesystem target (`filesystem`), and on S3 a
conditional write (`object_store`). A promoted adapter is only ever read back after its digests
were checked.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dpo_contract.pod import ChampionChangedError
from dpo_contract.reports import PromotionResult

from dpo_trainer.publish.target import Publication

log = logging.getLogger(__name__)

CURRENT = "current"
VERSIONS = "versions"
# The pointer write's condition: replace whatever is there.
ANY = "*any*"


class PointerChangedError(Exception):
    """`current` no longer names the champion the gate beat: another run wrote it first (seen
    by the compare, or by the store refusing the conditional write)."""


@dataclass
class PointerTarget(ABC):
    """A versions/ + current target; subclasses say how to copy, lock and swap the pointer."""

    uri: str
    fs: Any
    root: str

    def publish(self, publication: Publication) -> PromotionResult:
        digest = publication.adapter_digest
        current = self.pointer_and_tag()[0]
        if current is not None and current.digest == digest:
            log.info("%s already points at %s: nothing to do", self.uri, current.version)
            return current
        version = publication.version
        self.copy(publication.adapter, f"{self.root}/{VERSIONS}/{version}", digest)
        pointer = PromotionResult(
            version=version,
            digest=digest,
            uri=f"{self.uri.rstrip('/')}/{VERSIONS}/{version}",
            promoted_at=datetime.now(UTC).isoformat(timespec="seconds"),
            job=publication.job,
        )
        champion = publication.report.champion_digest
        with self.locked():
            if champion is None:
                self.write_pointer(pointer, ANY)
                return pointer
            now, tag = self.pointer_and_tag()
            try:
                if (now.digest if now else "") != champion:
                    raise PointerChangedError(self.uri)
                self.write_pointer(pointer, tag)
            except PointerChangedError:
                now = self.pointer_and_tag()[0]
                if now is not None and now.digest == digest:
                    log.info("%s was promoted meanwhile by a repeat of this run", digest)
                    return now
                raise _champion_changed(champion, self.uri, now) from None
        return pointer

    def pointer_and_tag(self) -> tuple[PromotionResult | None, str | None]:
        """`current` and the tag a conditional write of it must match (None when there is no
        pointer, or the target writes unconditionally)."""
        path = f"{self.root}/{CURRENT}"
        if not self.fs.exists(path):
            return None, None
        return PromotionResult.model_validate_json(self.fs.cat_file(path)), None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Held around the compare and the swap; no lock unless the target has one."""
        yield

    @abstractmethod
    def copy(self, adapter: Path, destination: str, digest: str) -> None:
        """Copy `adapter` to `destination` and check the copy against `digest`."""

    @abstractmethod
    def write_pointer(self, pointer: PromotionResult, tag: str | None) -> None:
        """Replace `current` in one step. `tag` is the condition: ANY, None (there must be no
        pointer) or the tag the pointer must still have; PointerChangedError when it had not."""


def pointer_bytes(pointer: PromotionResult) -> bytes:
    """`current` as written: the pointer's JSON."""
    return (pointer.model_dump_json(by_alias=True, indent=2) + "\n").encode()


def _champion_changed(
    champion: str, target: str, now: PromotionResult | None
) -> ChampionChangedError:
    return ChampionChangedError(
        f"the gate beat {champion or 'no promoted adapter'}, but {target}/{CURRENT} now points "
        f"at {now.version if now else 'nothing'} ({now.digest if now else 'none'}), promoted "
        "meanwhile by another run: this adapter was not promoted; run it again to be gated "
        "against the new one"
    )
