"""An adapter folder's digests: `manifest.json` records the sha256 of every file, and the digest
of that record names the adapter (in reports, promotion pointers and OCI annotations). Standard
library and pydantic only, so `dpo pull` verifies adapters where the ML stack is not installed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dpo_contract.pod import BadInputError

MANIFEST = "manifest.json"


def write_text_atomically(path: Path, text: str) -> None:
    """Write then rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(text.rstrip("\n") + "\n")
    staging.replace(path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, elsewhere: dict[str, str] | None = None) -> str:
    """Record the sha256 of every file in `directory`, and of the files `elsewhere` names (the
    parts other pods wrote into the same artifact, hashed where they were written); returns the
    digest of the whole set."""
    known = elsewhere or {}
    files = {
        str(path.relative_to(directory)): sha256_file(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
        and path.name != MANIFEST
        and str(path.relative_to(directory)) not in known
    }
    files = dict(sorted({**files, **known}.items()))
    digest = manifest_digest(files)
    manifest = {"files": files, "digest": digest}
    write_text_atomically(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    return digest


def manifest_digest(files: dict[str, str]) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def verify_manifest(directory: Path) -> str:
    """Check every file against manifest.json, and that no file is missing from it; returns the
    digest, or raises naming the file."""
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
    unlisted = sorted(
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_file() and p.name != MANIFEST and str(p.relative_to(directory)) not in files
    )
    if unlisted:
        raise BadInputError(
            f"{directory}: {', '.join(unlisted)} not listed in {MANIFEST}; the adapter was "
            "changed after it was written: retrain or restore it"
        )
    return manifest_digest(files)
