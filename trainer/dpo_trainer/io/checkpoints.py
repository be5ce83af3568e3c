"""Checkpoints in the run's artifacts, each rank its own bytes, nothing inside a collective.

A checkpoint folder holds files of every rank: DCP shards `__<rank>_<n>.distcp`, the RNG state
`rng_state_<rank>.pth`, and what rank 0 writes (DCP's `.metadata`, trainer_state.json, the
scheduler, a replicated model). After the Trainer's save each rank sends the files it wrote to
the store from a thread of its own, while training goes on, then its marker `ranks/<rank>.json`
(the files and their sizes). The rank that finds the whole world's markers present writes
`complete.json`, last: only a checkpoint with it is ever resumed from. On a mounted volume
nothing is sent; the markers are written the same way.

On resume each rank fetches the small shared files, its own RNG state, and of the DCP shards
only the byte ranges DCP will read for it: the rows of each tensor its shard holds (read from
`.metadata`, at whatever world size the checkpoint was written), into sparse files at the same
offsets. DCP reshards by itself; a rank never downloads another rank's rows.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_contract.manifest import write_text_atomically
from dpo_contract.reports import RankCheckpoints

from dpo_trainer.io.artifacts import CHECKPOINTS, Artifacts
from dpo_trainer.io.fetch import write_at

log = logging.getLogger(__name__)

# Written last, by the rank that saw every rank's marker: a checkpoint without it is incomplete.
COMPLETE_MARKER = "complete.json"
RANK_MARKERS = "ranks"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_RANK_FILE = re.compile(r"^(?:__(\d+)_\d+\.distcp|rng_state_(\d+)\.pth)$")
_DCP_METADATA = ".metadata"


class CheckpointUploadTimeoutError(Exception):
    """A rank's checkpoint uploads did not finish within their deadline."""


def owner(name: str) -> int:
    """The rank that writes a checkpoint file: its DCP shards and RNG state are its own, rank 0
    writes the rest."""
    match = _RANK_FILE.match(name)
    if match is None:
        return 0
    return int(match.group(1) or match.group(2))


def step_of(name: str) -> int:
    match = _CHECKPOINT.match(name)
    return int(match.group(1)) if match else -1


def shard_rows(rows: int, index: int, shards: int) -> tuple[int, int]:
    """The rows [start, stop) of a tensor's first dimension that shard `index` of `shards`
    holds, chunked as torch.chunk (and FSDP2) chunk them."""
    chunk = -(-rows // shards)
    return min(index * chunk, rows), min((index + 1) * chunk, rows)


@dataclass(frozen=True)
class RowShard:
    """Which rows of every sharded tensor a rank holds: shard `index` of `shards`."""

    index: int
    shards: int


@dataclass(frozen=True)
class ByteRange:
    path: str
    offset: int
    length: int


def needed_ranges(metadata: Any, shard: RowShard | None) -> list[ByteRange]:
    """The byte ranges of a DCP checkpoint (its `Metadata`) that a rank holding `shard` reads:
    of a tensor saved in several row chunks, the chunks that overlap its rows; of anything
    else (a tensor saved whole, such as an optimizer's step, or pickled bytes), all of it.
    Without a shard (a replicated model) every range is needed."""
    wanted: list[ByteRange] = []
    for index, stored in metadata.storage_data.items():
        described = metadata.state_dict_metadata[index.fqn]
        chunks = getattr(described, "chunks", None)
        if shard is not None and chunks and len(chunks) > 1 and index.offset is not None:
            chunk = next(c for c in chunks if tuple(c.offsets) == tuple(index.offset))
            start, stop = shard_rows(described.size[0], shard.index, shard.shards)
            first = chunk.offsets[0]
            if not (first < stop and start < first + chunk.sizes[0]):
                continue
        wanted.append(ByteRange(stored.relative_path, stored.offset, stored.length))
    return wanted


@dataclass
class CheckpointTransfer:
    """One rank's side of the checkpoints: sends what it wrote (in the background), fetches
    what it needs, and counts both."""

    artifacts: Artifacts
    rank: int
    world: int
    shard: RowShard | None
    keep: int
    global_batch: int
    counted: RankCheckpoints = field(init=False)
    _queue: queue.Queue[str | None] = field(init=False, default_factory=queue.Queue)
    _thread: threading.Thread | None = field(init=False, default=None)
    _error: BaseException | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.counted = RankCheckpoints(rank=self.rank)

    def _remote(self, relative: str) -> str:
        return f"{self.artifacts.remote_path}/{relative}"

    # Saving

    def saved(self, name: str) -> None:
        """The Trainer wrote this rank's part of `name` (checkpoint-<step>): send it, then mark
        it. Returns at once; the sending happens in this rank's upload thread."""
        self._raise_upload_error()
        if self.artifacts.is_local:
            self._mark(name, self._own_files(name))
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._send_all, name="checkpoint-upload")
            self._thread.daemon = True
            self._thread.start()
        self._queue.put(name)

    def wait(self, deadline_seconds: float) -> None:
        """Until every checkpoint this rank saved is sent and marked, or raise after
        `deadline_seconds` (this rank's own wait: no other rank waits on it)."""
        if self._thread is None:
            return
        started = time.monotonic()
        self._queue.put(None)
        self._thread.join(timeout=deadline_seconds)
        self.counted.wait_seconds = round(time.monotonic() - started, 3)
        if self._thread.is_alive():
            raise CheckpointUploadTimeoutError(
                f"rank {self.rank}: checkpoint uploads to {self.artifacts.uri} were not done "
                f"{deadline_seconds:.0f} s after training ended (network.transferTimeoutSeconds);"
                " check the object store's reachability and bandwidth from this pod, or raise "
                "the timeout"
            )
        self._thread = None
        self._raise_upload_error()

    def _raise_upload_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(
                f"rank {self.rank}: uploading a checkpoint to {self.artifacts.uri} failed: "
                f"{self._error}"
            ) from self._error

    def _send_all(self) -> None:
        while (name := self._queue.get()) is not None:
            if self._error is not None:
                continue
            try:
                self._send(name)
            except Exception as error:  # raised in the training thread at its next save or wait
                log.exception("rank %d: uploading %s failed", self.rank, name)
                self._error = error

    def _send(self, name: str) -> None:
        started = time.monotonic()
        files = self._own_files(name)
        fs = self.artifacts.fs
        for relative in files:
            remote = self._remote(f"{CHECKPOINTS}/{name}/{relative}")
            fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(self.artifacts.checkpoints / name / relative), remote)
            self.counted.uploaded_bytes += files[relative]
        self.counted.upload_seconds = round(
            self.counted.upload_seconds + time.monotonic() - started, 3
        )
        self._mark(name, files)
        self._prune_own_local(name)

    def _own_files(self, name: str) -> dict[str, int]:
        """This rank's files of a checkpoint it saved, relative to the folder, with sizes."""
        folder = self.artifacts.checkpoints / name
        return {
            str(path.relative_to(folder)): path.stat().st_size
            for path in sorted(folder.rglob("*"))
            if path.is_file()
            and RANK_MARKERS not in path.relative_to(folder).parts
            and path.name != COMPLETE_MARKER
            and not path.name.endswith(".tmp")  # write_text_atomically's staging
            and owner(path.name) == self.rank
        }

    def _mark(self, name: str, files: dict[str, int]) -> None:
        """This rank's marker; then, if every rank's is there, the checkpoint's own."""
        base = f"{CHECKPOINTS}/{name}"
        marker = json.dumps({"rank": self.rank, "world": self.world, "files": files})
        self._put(f"{base}/{RANK_MARKERS}/{self.rank}.json", marker)
        fs = self.artifacts.fs
        fs.invalidate_cache()
        listed = fs.ls(self._remote(f"{base}/{RANK_MARKERS}"), detail=False)
        if {p.rstrip("/").rsplit("/", 1)[-1] for p in listed} >= {
            f"{r}.json" for r in range(self.world)
        }:
            complete = {
                "world": self.world,
                "step": step_of(name),
                "globalBatch": self.global_batch,
            }
            self._put(f"{base}/{COMPLETE_MARKER}", json.dumps(complete))
            if not self.artifacts.is_local:
                self._prune_remote()
            log.info("%s is complete (every rank's part is in %s)", name, self.artifacts.uri)

    def _put(self, relative: str, text: str) -> None:
        """A small file of the run's artifacts, never seen half written on a shared volume."""
        if self.artifacts.is_local:
            write_text_atomically(self.artifacts.root / relative, text)
            return
        remote = self._remote(relative)
        self.artifacts.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
        self.artifacts.fs.pipe_file(remote, text.encode())

    def _prune_remote(self) -> None:
        """Keep the newest `keep` complete checkpoints in the store. Every rank sends its
        checkpoints in order, so nothing older than a complete one is still being sent."""
        fs = self.artifacts.fs
        names = self._stored_names()
        complete = self._complete(names)
        if len(complete) <= self.keep:
            return
        oldest_kept = step_of(complete[-self.keep])
        for name in names:
            if step_of(name) < oldest_kept:
                fs.rm(self._remote(f"{CHECKPOINTS}/{name}"), recursive=True)

    def _prune_own_local(self, sent: str) -> None:
        """This rank's files of the local copies of `sent` and older checkpoints: once sent,
        the store has them (a resume fetches what it needs), and the pod's disk holds only the
        checkpoint being written and the one being sent. Another rank of the pod may still be
        sending its own files of them: only this rank's go."""
        for folder in self.artifacts.checkpoints.iterdir():
            if not 0 <= step_of(folder.name) <= step_of(sent):
                continue
            for path in sorted(folder.rglob("*"), reverse=True):
                if path.is_file() and owner(path.name) == self.rank:
                    path.unlink(missing_ok=True)
                elif path.is_dir():
                    with contextlib.suppress(OSError):
                        path.rmdir()
            with contextlib.suppress(OSError):
                folder.rmdir()

    # Resuming

    def _stored_names(self) -> list[str]:
        """The run's checkpoint folders, complete or not, oldest first (the artifacts' file
        system serves a mounted path and a store alike)."""
        fs = self.artifacts.fs
        base = self._remote(CHECKPOINTS)
        fs.invalidate_cache()
        if not fs.exists(base):
            return []
        listed = (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False))
        return sorted((n for n in listed if step_of(n) >= 0), key=step_of)

    def _complete(self, names: list[str]) -> list[str]:
        fs = self.artifacts.fs
        return [n for n in names if fs.exists(self._remote(f"{CHECKPOINTS}/{n}/{COMPLETE_MARKER}"))]

    def latest_complete(self) -> str | None:
        """The newest complete checkpoint of the run, wherever the artifacts are."""
        return max(self._complete(self._stored_names()), key=step_of, default=None)

    def written_by(self, name: str) -> dict[str, int]:
        """What complete checkpoint `name` records of the run that wrote it: its world size,
        step and pairs per optimizer step."""
        text = self.artifacts.fs.cat_file(self._remote(f"{CHECKPOINTS}/{name}/{COMPLETE_MARKER}"))
        recorded: dict[str, int] = json.loads(text)
        return recorded

    def fetch(self, name: str) -> Path:
        """A local folder of checkpoint `name` holding what this rank reads from it."""
        local = self.artifacts.checkpoints / name
        if self.artifacts.is_local:
            return local
        fs = self.artifacts.fs
        base = self._remote(f"{CHECKPOINTS}/{name}")
        sizes: dict[str, int] = {
            path[len(base) + 1 :]: int(info["size"])
            for path, info in fs.find(base, detail=True).items()
        }
        shards = {p for p in sizes if p.endswith(".distcp")}
        for relative, size in sizes.items():
            if relative in shards or relative.startswith(f"{RANK_MARKERS}/"):
                continue
            if _RANK_FILE.match(Path(relative).name) and owner(Path(relative).name) != self.rank:
                continue  # another rank's RNG state
            self._download_whole(f"{base}/{relative}", local / relative, size)
        for metadata in sorted(p for p in sizes if Path(p).name == _DCP_METADATA):
            folder = str(Path(metadata).parent)
            for wanted in needed_ranges(_read_dcp_metadata(local / metadata), self.shard):
                relative = wanted.path if folder == "." else f"{folder}/{wanted.path}"
                self._download_range(f"{base}/{relative}", local / relative, wanted)
        return local

    def _download_whole(self, remote: str, local: Path, size: int) -> None:
        with _locked(local):
            if local.exists() and local.stat().st_size == size:
                return
            staging = local.with_name(f".{local.name}.{self.rank}.tmp")
            self.artifacts.fs.get_file(remote, str(staging))
            staging.replace(local)
        self.counted.downloaded_bytes += size

    def _download_range(self, remote: str, local: Path, wanted: ByteRange) -> None:
        """Bytes [offset, offset + length) of `remote`, written at the same offset of a sparse
        `local` file (ranks of one pod write their own ranges of the same files)."""
        data = self.artifacts.fs.cat_file(
            remote, start=wanted.offset, end=wanted.offset + wanted.length
        )
        local.parent.mkdir(parents=True, exist_ok=True)
        write_at(local, data, wanted.offset)
        self.counted.downloaded_bytes += len(data)


def _read_dcp_metadata(path: Path) -> Any:
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    return FileSystemReader(str(path.parent)).read_metadata()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process of the pod at a time downloads a given file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(f".{path.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
