"""The model initializer (`dpo-trainer init`), run in a CPU pod before any GPU is asked for.

It resolves the model where it lives (a hub id, an object store, a mounted volume or a path)
with the pod's own credentials, so the operator never reads a tenant's Secrets; counts it
exactly by building it on the meta device from its config (experts, tied weights and all); and,
where trainer.json names `model.staged`, copies it once into the run's storage so the training
pods read that copy instead of each downloading the model: in parallel, resumed where a cut-off
copy stopped, complete only once its marker is written. A model that cannot be resolved is bad
input (exit 2): the run fails here, in seconds, naming the model and the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from dpo_contract.config import TrainerConfig
from dpo_contract.fields import ModelRef, PolicyRef
from dpo_contract.pod import BadInputError
from dpo_contract.reports import ModelReport

from dpo_trainer.io.artifacts import Artifacts, upload_folder
from dpo_trainer.io.fetch import COMPLETE_MARKER, cached, download, is_remote
from dpo_trainer.io.models import build_on_meta

log = logging.getLogger(__name__)

MODEL_REPORT = "model.json"
CONFIG_FILE = "config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_SCALAR_TEXT_LIMIT = 64
HUB_WORKERS = 8


@dataclass(frozen=True)
class Listing:
    """The model's files (path relative to the model's folder → bytes) and the revision they
    were listed at (a hub commit; None elsewhere)."""

    sizes: dict[str, int]
    revision: str | None = None

    @property
    def weights(self) -> dict[str, int]:
        return {name: size for name, size in self.sizes.items() if name.endswith(WEIGHT_SUFFIXES)}


class Source(Protocol):
    """Where a model lives."""

    def listing(self) -> Listing: ...

    def fetch(self, names: list[str], into: Path) -> None:
        """Copy the files `names` (relative) under `into`."""

    def copy_all(self, into: Path) -> None:
        """Copy the whole model under `into`, going on from what a cut-off copy left there."""


def initialize(config: TrainerConfig) -> ModelReport:
    """Resolve, count and (where trainer.json says) stage the model; the report is also written
    to the run's artifacts as model.json."""
    ref = config.model
    source = model_source(ref)
    listing = source.listing()
    if CONFIG_FILE not in listing.sizes:
        raise BadInputError(
            f"model {ref.name}: no {CONFIG_FILE} among its {len(listing.sizes)} file(s); point "
            "spec.model.name at the folder that holds config.json and the weights"
        )
    if not listing.weights:
        raise BadInputError(
            f"model {ref.name}: no weight files (*.safetensors, *.bin) next to {CONFIG_FILE}; "
            "the checkpoint is incomplete or the path names the wrong folder"
        )
    with tempfile.TemporaryDirectory(prefix="dpo-model-config-") as folder:
        small = [name for name in listing.sizes if name not in listing.weights]
        source.fetch(small, Path(folder))
        parameters, largest = count_on_meta(Path(folder), config.trust_remote_code)
        model_config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    log.info(
        "model %s%s: %d parameters (%.2fB), %d weight file(s), %.2f GB",
        ref.name,
        f" at {listing.revision}" if listing.revision else "",
        parameters,
        parameters / 1e9,
        len(listing.weights),
        sum(listing.weights.values()) / 1e9,
    )
    if ref.staged:
        stage(source, ref.staged)
    report = ModelReport(
        name=ref.name,
        revision=listing.revision,
        parameters=parameters,
        largest_tensor=largest,
        dtype=_text(model_config.get("torch_dtype") or model_config.get("dtype")),
        bytes_on_disk=sum(listing.weights.values()),
        files=len(listing.weights),
        staged=ref.staged,
        config={key: value for key, value in model_config.items() if _is_scalar(key, value)},
    )
    Artifacts(config.artifacts_dir).write_report(MODEL_REPORT, report)
    return report


def count_on_meta(folder: Path, trust_remote_code: bool) -> tuple[int, int]:
    """Parameters of the model whose config (and code) is in `folder`, built on the meta device
    (nothing allocated), each shared weight once; and the elements of the largest one."""
    model = build_on_meta(
        ModelRef(name=str(folder)), trust_remote_code=trust_remote_code, dtype=torch.float32
    )
    sizes = [parameter.numel() for parameter in model.parameters()]
    return sum(sizes), max(sizes)


def stage(source: Source, target: str) -> None:
    """The model copied to `target` (a path on a volume, or an object-store URI) unless a
    complete copy is there; its completion marker is written last."""
    if not is_remote(target):
        path = Path(target)
        cached(path.parent, path.name, source.copy_all)
        log.info("model staged at %s", target)
        return
    import fsspec

    fs, remote = fsspec.core.url_to_fs(target)
    marker = f"{remote.rstrip('/')}/{COMPLETE_MARKER}"
    if fs.exists(marker):
        log.info("model already staged at %s", target)
        return
    # Through this pod's disk: a retried pod on the same node goes on from what is here.
    local = Path(tempfile.gettempdir()) / "dpo-stage" / hashlib.sha256(target.encode()).hexdigest()
    local.mkdir(parents=True, exist_ok=True)
    source.copy_all(local)
    upload_folder(fs, local, remote)
    fs.pipe_file(marker, b"staged by dpo-trainer init\n")
    log.info("model staged at %s", target)


def model_source(ref: PolicyRef) -> Source:
    if is_remote(ref.name):
        return StoreSource(ref.name)
    if ref.name.startswith(("/", ".")):
        return FolderSource(Path(ref.name))
    return HubSource(ref.name, ref.revision)


class FolderSource:
    """A model in a folder of the pod (a mounted volume, the image)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def listing(self) -> Listing:
        if not self.path.is_dir():
            raise BadInputError(
                f"model {self.path}: no such folder; check the path, and for pvc:// that the "
                "claim holds it"
            )
        files = [p for p in self.path.rglob("*") if p.is_file() and not p.name.startswith(".")]
        return Listing({str(p.relative_to(self.path)): p.stat().st_size for p in files})

    def fetch(self, names: list[str], into: Path) -> None:
        for name in names:
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.path / name, into / name)

    def copy_all(self, into: Path) -> None:
        shutil.copytree(self.path, into, dirs_exist_ok=True)


class StoreSource:
    """A model in an object store (s3://, gs://, az://; file:// in tests)."""

    def __init__(self, uri: str) -> None:
        import fsspec

        self.uri = uri.rstrip("/")
        try:
            self.fs, self.path = fsspec.core.url_to_fs(self.uri)
        except (ValueError, ImportError) as error:
            raise BadInputError(f"model {uri}: cannot open ({error}); check the scheme") from None

    def listing(self) -> Listing:
        try:
            found = self.fs.find(self.path, detail=True)
        except PermissionError as error:
            raise BadInputError(
                f"model {self.uri}: access denied ({error}); give the DPOJob credentials that "
                "may read it (spec.secrets, or the node's role)"
            ) from None
        if not found:
            raise BadInputError(
                f"model {self.uri}: nothing there; check the bucket and path, and that the "
                "pod's credentials may list it"
            )
        base = self.path.rstrip("/") + "/"
        return Listing(
            {
                name.removeprefix(base): int(detail.get("size") or 0)
                for name, detail in found.items()
                if not name.rsplit("/", 1)[-1].startswith(".")
            }
        )

    def fetch(self, names: list[str], into: Path) -> None:
        for name in names:
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(f"{self.path}/{name}", str(into / name))

    def copy_all(self, into: Path) -> None:
        download(self.uri, into)


class HubSource:
    """A model on the Hugging Face Hub, at its revision resolved to a commit once, so the copy
    and the count are of the same files; HF_TOKEN (spec.secrets) reaches gated models."""

    def __init__(self, repo: str, revision: str | None) -> None:
        self.repo, self.revision = repo, revision
        self.commit: str | None = None

    def listing(self) -> Listing:
        from huggingface_hub import HfApi

        try:
            info = HfApi().model_info(self.repo, revision=self.revision, files_metadata=True)
        except Exception as error:
            raise _hub_error(self.repo, self.revision, error) from None
        self.commit = info.sha
        siblings = info.siblings or []
        return Listing({s.rfilename: int(s.size or 0) for s in siblings}, revision=info.sha)

    def fetch(self, names: list[str], into: Path) -> None:
        self._download(into, names)

    def copy_all(self, into: Path) -> None:
        self._download(into, None)

    def _download(self, into: Path, names: list[str] | None) -> None:
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(
                self.repo,
                revision=self.commit or self.revision,
                local_dir=into,
                allow_patterns=names,
                max_workers=HUB_WORKERS,
            )
        except Exception as error:
            raise _hub_error(self.repo, self.revision, error) from None


def _hub_error(repo: str, revision: str | None, error: Exception) -> Exception:
    """Bad input where the hub says the model or revision is not there for these credentials;
    anything else (the network) stays an error that a retry may get past."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    said = type(error).__name__
    if isinstance(error, GatedRepoError):
        return BadInputError(
            f"model {repo}: gated ({said}); accept its licence on the hub and give the DPOJob an "
            "HF_TOKEN secret (spec.secrets) of an account that did"
        )
    if isinstance(error, RevisionNotFoundError):
        return BadInputError(
            f"model {repo}: no revision {revision!r} ({said}); name a branch, tag or commit it has"
        )
    if isinstance(error, RepositoryNotFoundError | HFValidationError):
        return BadInputError(
            f"model {repo}: not found on the hub ({said}); check the id, and for a private model "
            "the HF_TOKEN secret"
        )
    return error


def _is_scalar(key: str, value: Any) -> bool:
    """The entries planning reads: numbers (sizes, heads, experts) and the architecture; the
    rest would only crowd the termination message (the kubelet keeps 4 KiB)."""
    if isinstance(value, str):
        return key == "model_type" and len(value) <= _SCALAR_TEXT_LIMIT
    return isinstance(value, int | float | bool)


def _text(value: Any) -> str | None:
    return str(value)[:32] if value else None
