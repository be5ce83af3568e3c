"""The run's artifacts directory: `<output>/<namespace>/<name>/<uid>/`.

Holds `checkpoints/`, `adapter/` (with a `manifest.json` of sha256 digests), `train.json` and
`eval.json`. A path (a mounted PVC, shared by every pod) is used directly. A URI (`s3://`,
`gs://`, ...; `file://` stands in for a bucket in tests) is an object store that the pods share
while their disks are their own: each pod works in a local mirror under its temporary directory,
uploads what it wrote, and downloads what it needs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import fsspec
from dpo_contract.manifest import write_text_atomically
from pydantic import BaseModel

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
TRAIN_REPORT = "train.json"
EVAL_REPORT = "eval.json"
Report = TypeVar("Report", bound=BaseModel)


class Artifacts:
    """A run's artifacts, always reachable through a local directory `root`."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.remote_path = fsspec.core.url_to_fs(uri)
        self.is_local = "://" not in uri
        if self.is_local:
            self.root = Path(self.remote_path)
        else:
            # The pod's own temporary directory: nothing here is seen by another pod.
            digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
            self.root = Path(tempfile.gettempdir()) / "dpo-artifacts" / digest
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER

    def _remote(self, relative: str) -> str:
        return f"{self.remote_path}/{relative}"

    def read_report(self, name: str, report: type[Report]) -> Report | None:
        """A report (train.json, eval.json) of this run, or None when there is none yet."""
        if self.is_local:
            path = self.root / name
            return report.model_validate_json(path.read_text()) if path.exists() else None
        if not self.fs.exists(self._remote(name)):
            return None
        return report.model_validate_json(self.fs.cat_file(self._remote(name)))

    def write_report(self, name: str, report: BaseModel) -> None:
        write_text_atomically(self.root / name, report.model_dump_json(by_alias=True, indent=2))
        self.upload(name)

    def upload(self, relative: str) -> None:
        """Copy a file or folder of the local mirror to the store (no-op for a mounted path)."""
        if self.is_local:
            return
        source = self.root / relative
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        for path in files:
            remote = self._remote(str(path.relative_to(self.root)))
            self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(path), remote)

    def fetch(self, relative: str) -> Path:
        """The local copy of a folder of the store, downloaded unless already here."""
        local = self.root / relative
        if not self.is_local and self.fs.exists(self._remote(relative)):
            download_folder(self.fs, self._remote(relative), local)
        return local


def download_folder(fs: Any, remote: str, local: Path) -> None:
    """The files under `remote` as the folder `local`, replacing what was there. The trailing
    slashes make fsspec copy the folder's contents, never the folder into an existing one."""
    shutil.rmtree(local, ignore_errors=True)
    fs.get(f"{remote.rstrip('/')}/", f"{local}/", recursive=True)


def upload_folder(fs: Any, local: Path, remote: str) -> None:
    """The files under `local` to the folder `remote` (contents, as `download_folder`)."""
    fs.put(f"{local}/", f"{remote.rstrip('/')}/", recursive=True)


ADAPTER_CONFIG = "adapter_config.json"


def name_served_base_model(adapter: Path, served_model_name: str) -> None:
    """Point the adapter at the base model by the name it is served under: vLLM (and PEFT's
    loaders) read `base_model_name_or_path`, which PEFT wrote as wherever training loaded the
    model from (a cache path inside the pod)."""
    path = adapter / ADAPTER_CONFIG
    settings = json.loads(path.read_text())
    settings["base_model_name_or_path"] = served_model_name
    write_text_atomically(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def replace_directory(source: Path, target: Path) -> None:
    """Move `source` to `target`, replacing whatever was there."""
    if target.exists():
        shutil.rmtree(target)
    source.rename(target)
