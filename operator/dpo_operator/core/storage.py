"""Storage URIs in the pods: pvc:// URIs become mounted paths (or, for `dpo run`, local
directories); object-store URIs are passed through.
"""

from __future__ import annotations

from collections.abc import Mapping

from dpo_contract.fields import DataSource, ModelRef
from dpo_contract.presets import BUILTIN_PREFIX
from dpo_contract.reports import REFERENCE_CACHE_DIR

from dpo_operator.api import DPOJob, DPOJobSpec
from dpo_operator.core.names import run_id

PVC_MOUNT_ROOT = "/mnt/pvc"


def pvc_claim(uri: str) -> str | None:
    if not uri.startswith("pvc://"):
        return None
    return uri.removeprefix("pvc://").split("/", 1)[0]


ClaimPaths = Mapping[str, str]


def pod_path(uri: str, claim_paths: ClaimPaths | None = None) -> str:
    """Where a storage URI is reachable inside a pod (or, with `claim_paths`, on this machine)."""
    claim = pvc_claim(uri)
    if claim is None:
        return uri
    rest = uri.removeprefix(f"pvc://{claim}").strip("/")
    root = (claim_paths or {}).get(claim, f"{PVC_MOUNT_ROOT}/{claim}")
    return root + (f"/{rest}" if rest else "")


def in_pod(source: DataSource, claim_paths: ClaimPaths | None) -> DataSource:
    if source.uri is None:
        return source
    return source.model_copy(update={"uri": pod_path(source.uri, claim_paths)})


def optional_in_pod(source: DataSource | None, claim_paths: ClaimPaths | None) -> DataSource | None:
    return None if source is None else in_pod(source, claim_paths)


def model_in_pod(ref: ModelRef, claim_paths: ClaimPaths | None) -> ModelRef:
    return ref.model_copy(update={"name": pod_path(ref.name, claim_paths)})


STAGED_MODEL_DIR = "base-model"


def model_is_on_hub(name: str) -> bool:
    """A hub id (org/model): neither builtin, nor a URI, nor a path."""
    return not (name.startswith((BUILTIN_PREFIX, "/", ".")) or "://" in name)


def initializes_model(spec: DPOJobSpec) -> bool:
    """Whether a model initializer runs before training: for any model but a builtin one (built
    from a preset the operator knows exactly), unless spec.model.initialize is false."""
    return spec.model.initialize and not spec.model.name.startswith(BUILTIN_PREFIX)


def staged_model(job: DPOJob, claim_paths: ClaimPaths | None = None) -> str | None:
    """Where the initializer copies the model for the training pods, as they see it: a hub model
    always (one download instead of one per pod, from a hub that limits rates), an object-store
    model when the run's storage is a volume (the pods read the volume instead of each
    downloading). None: the pods read the model where it is."""
    spec = job.spec
    if not initializes_model(spec):
        return None
    name = spec.model.name
    on_volume = pvc_claim(spec.output.uri) is not None
    from_store = "://" in name and pvc_claim(name) is None
    if model_is_on_hub(name) or (from_store and on_volume):
        return f"{artifacts_dir(job, claim_paths)}/{STAGED_MODEL_DIR}"
    return None


def claims(job: DPOJob) -> list[str]:
    """The PersistentVolumeClaims the job's pvc:// URIs name."""
    spec = job.spec
    uris = [spec.model.name, spec.output.uri]
    if spec.model.reference:
        uris.append(spec.model.reference.name)
    if spec.promotion:
        uris.append(spec.promotion.target)
    for source in (
        spec.data.train,
        spec.data.eval,
        spec.eval_gate.data,
        spec.eval_gate.anchor_data,
    ):
        if source is not None and source.uri is not None:
            uris.append(source.uri)
    return sorted({claim for uri in uris if (claim := pvc_claim(uri))})


def artifacts_dir(job: DPOJob, claim_paths: ClaimPaths | None = None) -> str:
    """<output>/<namespace>/<name>/<uid>, as the pods see it."""
    output = pod_path(job.spec.output.uri, claim_paths).rstrip("/")
    return f"{output}/{job.namespace}/{job.name}/{run_id(job)}"


def reference_cache_dir(job: DPOJob, claim_paths: ClaimPaths | None = None) -> str:
    """<output>/<namespace>/reference-logps: shared by the namespace's runs on that output."""
    output = pod_path(job.spec.output.uri, claim_paths).rstrip("/")
    return f"{output}/{job.namespace}/{REFERENCE_CACHE_DIR}"
