"""Local copies made once per machine: builtin models, and models and data from object stores.

`from_pretrained` reads hub ids and local paths; an `s3://`, `gs://`, `az://` (or, in tests,
`file://`) model or dataset is first downloaded to local disk, with its progress in the log.
A cache entry is filled under a lock (one process fills it, the others of the pod wait and
reuse it) in a staging directory that is renamed into place, and it counts only once its
completion marker is written: an entry half-filled by a crash is deleted and filled again.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from dpo_contract.pod import BadInputError

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "file://")
_PROGRESS_EVERY_SECONDS = 10.0


def is_remote(uri: str) -> bool:
    return uri.startswith(REMOTE_SCHEMES)


def cached(cache_dir: Path, entry: str, fill: Callable[[Path], None]) -> Path:
    """`cache_dir/entry`, filled by `fill(staging)` unless a complete copy is already there."""
    target = cache_dir / entry
    if (target / COMPLETE_MARKER).exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / f".{entry}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, even on a crash
        if (target / COMPLETE_MARKER).exists():
            return target  # filled by another process while this one waited
        for leftover in [target, *cache_dir.glob(f".{entry}-*")]:
            if leftover.exists():
                log.warning("%s: an interrupted fill left it incomplete; starting again", leftover)
                shutil.rmtree(leftover)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry}-", dir=cache_dir))
        fill(staging)
        (staging / COMPLETE_MARKER).write_text(f"{entry}\n")
        staging.rename(target)
    return target


def remote_entry(uri: str, revision: str | None = None) -> str:
    """A cache entry name for a remote URI: readable, and unique per URI and revision."""
    digest = hashlib.sha256(f"{uri}@{revision or ''}".encode()).hexdigest()[:16]
    tail = uri.rstrip("/").rsplit("/", 1)[-1].replace("*", "_") or "root"
    return f"{tail[:48]}-{digest}"


def download(uri: str, destination: Path) -> None:
    """Copy the file, folder or glob at `uri` under `destination`, logging progress by bytes."""
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
    total, done, shown = sum(sizes.values()), 0, time.monotonic()
    log.info("downloading %s: %d file(s), %.2f GiB", uri, len(sizes), total / 2**30)
    for remote in sorted(sizes):
        local = destination / remote[len(base) :].lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(local))
        done += sizes[remote]
        if time.monotonic() - shown >= _PROGRESS_EVERY_SECONDS or done == total:
            shown = time.monotonic()
            log.info(
                "downloading %s: %.0f%% (%.2f of %.2f GiB)",
                uri,
                100 * done / max(total, 1),
                done / 2**30,
                total / 2**30,
            )
