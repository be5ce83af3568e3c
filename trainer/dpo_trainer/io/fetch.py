"""Local copies made once per machine: builtin models, and models and data from object stores.

`from_pretrained` reads hub ids and local paths; an `s3://`, `gs://`, `az://` (or, in tests,
`file://`) model or dataset is first downloaded to local disk, with its progress in the log:
in ranges of CHUNK_BYTES read by STREAMS streams at once, each range written in place and
recorded as done, so a download cut off by a crash or a restarted container goes on where it
stopped. A cache entry is filled under a lock (one process fills it, the others of the pod wait
and reuse it) in a staging directory that is renamed into place, and it counts only once its
completion marker is written.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from dpo_contract.fields import STORE_SCHEMES
from dpo_contract.pod import BadInputError

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"
REMOTE_SCHEMES = tuple(f"{scheme}://" for scheme in STORE_SCHEMES)
_PROGRESS_EVERY_SECONDS = 10.0
# Ranged reads: many streams fill a fast link that one cannot, and a cut-off download loses at
# most the ranges in flight.
STREAMS = 8
CHUNK_BYTES = 64 * 2**20


def is_remote(uri: str) -> bool:
    return uri.startswith(REMOTE_SCHEMES)


def cached(cache_dir: Path, entry: str, fill: Callable[[Path], object]) -> Path:
    """`cache_dir/entry`, filled by `fill(staging)` unless a complete copy is already there."""
    target = cache_dir / entry
    if (target / COMPLETE_MARKER).exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / f".{entry}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, even on a crash
        if (target / COMPLETE_MARKER).exists():
            return target  # filled by another process while this one waited
        if target.exists():
            log.warning("%s: an interrupted fill left it incomplete; starting again", target)
            shutil.rmtree(target)
        # A fill cut off before goes on in the same staging directory.
        staging = cache_dir / f".{entry}.partial"
        staging.mkdir(exist_ok=True)
        fill(staging)
        (staging / COMPLETE_MARKER).write_text(f"{entry}\n")
        staging.rename(target)
    return target


def remote_entry(uri: str, revision: str | None = None) -> str:
    """A cache entry name for a remote URI: readable, and unique per URI and revision."""
    digest = hashlib.sha256(f"{uri}@{revision or ''}".encode()).hexdigest()[:16]
    tail = uri.rstrip("/").rsplit("/", 1)[-1].replace("*", "_") or "root"
    return f"{tail[:48]}-{digest}"


def download(
    uri: str, destination: Path, *, streams: int = STREAMS, chunk_bytes: int = CHUNK_BYTES
) -> int:
    """Copy the file, folder or glob at `uri` under `destination`, `streams` ranges at a time,
    logging progress by bytes; ranges already there (a download cut off before) are not read
    again. Returns the bytes read."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as error:
        raise BadInputError(f"{uri}: cannot open ({error}); check the URI scheme") from None
    if fs.isdir(path):
        base = path.rstrip("/")
        sizes = {f: int(d.get("size") or 0) for f, d in fs.find(path, detail=True).items()}
    else:
        matches = fs.glob(path, detail=True) if any(c in path for c in "*?[") else {}
        if not matches and fs.exists(path):
            matches = {path: fs.info(path)}
        base = path.rsplit("/", 1)[0]
        sizes = {f: int(d.get("size") or 0) for f, d in matches.items() if d["type"] == "file"}
    if not sizes:
        raise BadInputError(
            f"{uri}: nothing there; check the bucket and path, and that the pod's credentials "
            "(spec.output.credentialsSecret or the node's role) may read it"
        )
    files = [
        _PartialFile(remote, destination / remote[len(base) :].lstrip("/"), size, chunk_bytes)
        for remote, size in sorted(sizes.items())
    ]
    total = sum(sizes.values())
    done = sum(f.done_bytes() for f in files)
    log.info(
        "downloading %s: %d file(s), %.2f GiB, %d streams%s",
        uri,
        len(files),
        total / 2**30,
        streams,
        f" (resumed: {done / 2**30:.2f} GiB already here)" if done else "",
    )
    read, shown = 0, time.monotonic()
    with ThreadPoolExecutor(max_workers=streams) as pool:
        pending = [pool.submit(f.fetch, fs, start) for f in files for start in f.missing()]
        for finished in as_completed(pending):
            got = finished.result()
            read, done = read + got, done + got
            if time.monotonic() - shown >= _PROGRESS_EVERY_SECONDS or done == total:
                shown = time.monotonic()
                log.info(
                    "downloading %s: %.0f%% (%.2f of %.2f GiB)",
                    uri,
                    100 * done / max(total, 1),
                    done / 2**30,
                    total / 2**30,
                )
    for file in files:
        file.finish()
    return read


def write_at(path: Path, data: bytes, offset: int) -> None:
    """`data` written at `offset` of `path` (created if missing), the rest of it untouched:
    several threads or processes may each fill their own ranges of one file."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        written = 0
        while written < len(data):
            written += os.pwrite(descriptor, data[written:], offset + written)
    finally:
        os.close(descriptor)


class _PartialFile:
    """One file being downloaded in ranges: written in place, each range recorded in a
    `.<name>.ranges` file once written."""

    def __init__(self, remote: str, local: Path, size: int, chunk_bytes: int) -> None:
        self.remote, self.local, self.size, self.chunk_bytes = remote, local, size, chunk_bytes
        self.ranges = local.with_name(f".{local.name}.ranges")
        self._lock = threading.Lock()

    def _recorded(self) -> set[int]:
        if not self.ranges.exists():
            return set() if not self.local.exists() else set(self._starts())
        return {int(line) for line in self.ranges.read_text().split()}

    def _starts(self) -> range:
        return range(0, max(self.size, 1), self.chunk_bytes)

    def done_bytes(self) -> int:
        done = self._recorded()
        return sum(min(self.chunk_bytes, self.size - start) for start in done if start < self.size)

    def missing(self) -> list[int]:
        """The starts of the ranges still to read; prepares the file for them."""
        if self.local.exists() and not self.ranges.exists():
            return []  # complete from an earlier fill
        done = self._recorded()
        self.local.parent.mkdir(parents=True, exist_ok=True)
        self.ranges.touch()
        with self.local.open("ab") as stream:
            stream.truncate(self.size)
        return [start for start in self._starts() if start not in done]

    def fetch(self, fs: Any, start: int) -> int:
        end = min(start + self.chunk_bytes, self.size)
        data = fs.cat_file(self.remote, start=start, end=end) if end > start else b""
        write_at(self.local, data, start)
        with self._lock, self.ranges.open("a") as record:
            record.write(f"{start}\n")
        return len(data)

    def finish(self) -> None:
        self.ranges.unlink(missing_ok=True)
