"""The run's artifacts directory: `<output>/<namespace>/<name>/<uid>/`.

Holds `checkpoints/`, `adapter/` (with a `manifest.json` of sha256 digests), `train.json` and
`eval.json`. A local path (a mounted PVC) is used directly; an object-store URI gets a local
mirror that is uploaded after every checkpoint and at the end, and downloaded on restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from dpo_trainer.config import BadInputError

MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
TRAIN_REPORT = "train.json"
EVAL_REPORT = "eval.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# The Trainer writes trainer_state.json last: a checkpoint without it was cut off mid-save.
_CHECKPOINT_COMPLETE_MARKER = "trainer_state.json"


class Artifacts:
    """A run's artifacts, always reachable through a local directory `root`."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.remote_path = fsspec.core.url_to_fs(uri)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            self.root = Path(self.remote_path)
        else:
            digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
            self.root = Path(tempfile.gettempdir()) / "dpo-artifacts" / digest
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER

    def read_json(self, name: str) -> dict[str, Any] | None:
        if not self.is_local and self.fs.exists(f"{self.remote_path}/{name}"):
            self.fs.get(f"{self.remote_path}/{name}", str(self.root / name))
        path = self.root / name
        if not path.exists():
            return None
        loaded: dict[str, Any] = json.loads(path.read_text())
        return loaded

    def write_json(self, name: str, content: dict[str, Any]) -> None:
        write_json_atomically(self.root / name, content)
        self.upload(name)

    def upload(self, relative: str) -> None:
        """Copy a file or folder of the local mirror to the object store (no-op when local)."""
        if self.is_local:
            return
        source = self.root / relative
        self.fs.put(str(source), f"{self.remote_path}/{relative}", recursive=source.is_dir())

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, fetched from the object store if needed."""
        if not self.is_local:
            remote = f"{self.remote_path}/{CHECKPOINTS}"
            names = (
                [p.rsplit("/", 1)[-1] for p in self.fs.ls(remote, detail=False)]
                if (self.fs.exists(remote))
                else []
            )
            complete = [
                n
                for n in names
                if _CHECKPOINT.match(n)
                and self.fs.exists(f"{remote}/{n}/{_CHECKPOINT_COMPLETE_MARKER}")
            ]
            if complete:
                newest = max(complete, key=_step)
                if not (self.checkpoints / newest / _CHECKPOINT_COMPLETE_MARKER).exists():
                    self.fs.get(
                        f"{remote}/{newest}", str(self.checkpoints / newest), recursive=True
                    )
        if not self.checkpoints.exists():
            return None
        complete_local = [
            path
            for path in self.checkpoints.iterdir()
            if _CHECKPOINT.match(path.name) and (path / _CHECKPOINT_COMPLETE_MARKER).exists()
        ]
        return max(complete_local, key=lambda path: _step(path.name), default=None)


def _step(name: str) -> int:
    match = _CHECKPOINT.match(name)
    return int(match.group(1)) if match else -1


def write_json_atomically(path: Path, content: dict[str, Any]) -> None:
    """Write then rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    staging.replace(path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> str:
    """Record the sha256 of every file in `directory`; returns the digest of the whole set."""
    files = {
        str(path.relative_to(directory)): sha256_file(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    digest = manifest_digest(files)
    write_json_atomically(directory / MANIFEST, {"files": files, "digest": digest})
    return digest


def manifest_digest(files: dict[str, str]) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def verify_manifest(directory: Path) -> str:
    """Check every file against manifest.json; returns the digest, or raises naming the file."""
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        raise BadInputError(f"{directory}: no {MANIFEST}; the adapter was not written completely")
    files: dict[str, str] = json.loads(manifest_path.read_text())["files"]
    for relative, expected in files.items():
        path = directory / relative
        if not path.exists():
            raise BadInputError(f"{path}: listed in {MANIFEST} but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise BadInputError(
                f"{path}: digest mismatch (manifest sha256 {expected[:12]}..., file "
                f"{actual[:12]}...); the adapter is corrupted: retrain or restore it"
            )
    return manifest_digest(files)


def replace_directory(source: Path, target: Path) -> None:
    """Move `source` to `target`, replacing whatever was there."""
    if target.exists():
        shutil.rmtree(target)
    source.rename(target)
