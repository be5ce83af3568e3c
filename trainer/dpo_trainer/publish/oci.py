"""Adapters as OCI artifacts, pushed and pulled over the OCI distribution API (ORAS conventions).

An adapter is one image manifest with `artifactType` ADAPTER_ARTIFACT_TYPE and the empty config.
Its layers are the adapter's files, each titled with its path (`org.opencontainers.image.title`,
the name `oras pull` gives the file). Annotations carry what a server needs before it downloads
anything: the base model it is served on, the LoRA rank, the adapter's digest (manifest.json's)
and the gate's verdict. The gate report (eval.json) is a second manifest whose `subject` is the
adapter's: a referrer. A registry with the referrers API indexes it itself, and says so by
answering the push with `OCI-Subject`. For the others (distribution 2.x) the index is kept under
the fallback tag `sha256-<hex of the adapter's manifest digest>`, as the distribution spec says.

A promotion pushes the blobs, then the manifest under the version's tag, then the gate report,
and moves the tag `current` last: a reader of `current` sees the old adapter or the new one,
never one without its report. Promoting the same adapter again changes nothing.

Pulling checks the manifest against the digest asked for, every blob against its descriptor
(sha256 and size), the files against manifest.json, and that a gate report passed this very
adapter. Nothing is left at the destination unless all of that held.

Standard library only (and the pod contract's models), so `dpo pull` runs where neither the ML
stack nor fsspec is installed. Credentials: OCI_USERNAME and OCI_PASSWORD (for a promotion, keys
of output.credentialsSecret), sent as HTTP basic auth or traded for a bearer token, as the
registry's challenge asks.
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dpo_contract.config import JobIdentity
from dpo_contract.manifest import MANIFEST, sha256_file, verify_manifest
from dpo_contract.oci import (
    ADAPTER_ARTIFACT_TYPE,
    ADAPTER_DIGEST,
    ARTIFACT_CHECKS,
    BASE_MODEL,
    BINARY_FILE,
    CREATED,
    CURRENT_TAG,
    EMPTY_CONFIG_DATA,
    EVAL_REPORT_TITLE,
    GATE_REPORT_ARTIFACT_TYPE,
    GATE_VERDICT,
    IMAGE_MANIFEST,
    JOB,
    JOB_UID,
    JSON_FILE,
    LORA_RANK,
    VERSION,
    Reference,
)
from dpo_contract.pod import BadInputError
from dpo_contract.reports import GateReport, PromotionResult

from dpo_trainer.publish.registry import (
    EMPTY_CONFIG_DESCRIPTOR,
    Descriptor,
    Registry,
    canonical_json,
    sha256_digest,
)
from dpo_trainer.publish.target import Publication


@dataclass(frozen=True)
class OciTarget:
    """An OCI repository: the version is a tag, `current` a moving tag."""

    uri: str
    plain_http: bool = False

    def publish(self, publication: Publication) -> PromotionResult:
        return push_adapter(self.uri, publication, plain_http=self.plain_http)


def push_adapter(
    target: str,
    publication: Publication,
    *,
    plain_http: bool = False,
    registry: Registry | None = None,
) -> PromotionResult:
    """Publish a gated adapter to `target` (oci://registry/repository); returns its pointer."""
    where = Reference.parse(target)
    if where.tag or where.digest:
        raise BadInputError(
            f"promotion.target {target}: name the repository only; the version is the tag"
        )
    registry = registry or Registry(where.registry, plain_http=plain_http)
    repository = where.repository
    current = registry.fetch_manifest(repository, CURRENT_TAG)
    if current is not None:
        promoted = _annotations(current[0])
        if promoted.get(ADAPTER_DIGEST) == publication.adapter_digest:
            return _pointer(where, promoted, current[1], publication.job)

    # Both manifests (the adapter's and its gate report's) have the empty config.
    registry.push_blob(
        repository, EMPTY_CONFIG_DESCRIPTOR.digest, EMPTY_CONFIG_DESCRIPTOR.size, EMPTY_CONFIG_DATA
    )
    layers = []
    for path in sorted(p for p in publication.adapter.rglob("*") if p.is_file()):
        title = str(path.relative_to(publication.adapter))
        digest, size = "sha256:" + sha256_file(path), path.stat().st_size
        registry.push_blob(repository, digest, size, path)
        media = JSON_FILE if path.suffix == ".json" else BINARY_FILE
        layers.append(Descriptor(media, digest, size, title).as_json())
    annotations = {
        CREATED: datetime.now(UTC).isoformat(timespec="seconds"),
        VERSION: publication.version,
        BASE_MODEL: publication.served_model_name,
        ADAPTER_DIGEST: publication.adapter_digest,
        GATE_VERDICT: publication.report.verdict,
        JOB: f"{publication.job.namespace}/{publication.job.name}",
        JOB_UID: publication.job.uid,
    }
    checks = publication.report.artifact_checks
    if checks:
        annotations[ARTIFACT_CHECKS] = ",".join(
            f"{c.name}={'pass' if c.passed else 'fail'}" for c in checks
        )
    rank = _lora_rank(publication.adapter)
    if rank is not None:
        annotations[LORA_RANK] = str(rank)
    manifest = _artifact_manifest(ADAPTER_ARTIFACT_TYPE, layers, annotations)
    manifest_digest = sha256_digest(manifest)
    registry.push_manifest(repository, publication.version, manifest, IMAGE_MANIFEST)
    _push_gate_report(registry, repository, manifest_digest, len(manifest), publication)
    registry.push_manifest(repository, CURRENT_TAG, manifest, IMAGE_MANIFEST)
    return _pointer(where, annotations, manifest_digest, publication.job)


def _push_gate_report(
    registry: Registry, repository: str, subject: str, subject_size: int, publication: Publication
) -> None:
    report_json = publication.report_json
    report_digest = sha256_digest(report_json)
    registry.push_blob(repository, report_digest, len(report_json), report_json)
    annotations = {
        CREATED: datetime.now(UTC).isoformat(timespec="seconds"),
        GATE_VERDICT: publication.report.verdict,
        ADAPTER_DIGEST: publication.report.adapter_digest,
    }
    layer = Descriptor(JSON_FILE, report_digest, len(report_json), EVAL_REPORT_TITLE).as_json()
    manifest = _artifact_manifest(
        GATE_REPORT_ARTIFACT_TYPE,
        [layer],
        annotations,
        subject=Descriptor(IMAGE_MANIFEST, subject, subject_size).as_json(),
    )
    digest = sha256_digest(manifest)
    if not registry.push_manifest(repository, digest, manifest, IMAGE_MANIFEST):
        referrer = Descriptor(IMAGE_MANIFEST, digest, len(manifest)).as_json(
            artifactType=GATE_REPORT_ARTIFACT_TYPE, annotations=annotations
        )
        registry.add_referrer(repository, subject, referrer)


def _artifact_manifest(
    artifact_type: str,
    layers: list[dict[str, Any]],
    annotations: dict[str, str],
    *,
    subject: dict[str, Any] | None = None,
) -> bytes:
    """An OCI image manifest of an artifact (ORAS' form: the empty config), as pushed."""
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": IMAGE_MANIFEST,
        "artifactType": artifact_type,
        "config": EMPTY_CONFIG_DESCRIPTOR.as_json(
            data=base64.b64encode(EMPTY_CONFIG_DATA).decode()
        ),
        "layers": layers,
        "annotations": annotations,
    }
    if subject is not None:
        manifest["subject"] = subject
    return canonical_json(manifest)


def _annotations(manifest: Mapping[str, Any]) -> dict[str, str]:
    annotations = manifest.get("annotations") or {}
    return {str(k): str(v) for k, v in annotations.items()}


def _pointer(
    where: Reference, annotations: Mapping[str, str], digest: str, job: JobIdentity
) -> PromotionResult:
    return PromotionResult(
        version=annotations.get(VERSION, digest),
        digest=annotations.get(ADAPTER_DIGEST, ""),
        uri=where.at(digest),
        promoted_at=annotations.get(CREATED, ""),
        job=job,
    )


def _lora_rank(adapter: Path) -> int | None:
    path = adapter / "adapter_config.json"
    if not path.exists():
        return None
    rank = json.loads(path.read_text()).get("r")
    return rank if isinstance(rank, int) else None


@dataclass(frozen=True)
class PulledAdapter:
    """An adapter pulled and verified: where it is, what it is, and the gate that passed it."""

    directory: Path
    reference: str  # repository@digest: what was pulled, whatever tag named it
    version: str
    adapter_digest: str
    base_model: str
    gate: GateReport


def pull_adapter(
    uri: str, destination: Path, *, plain_http: bool = False, registry: Registry | None = None
) -> PulledAdapter:
    """Fetch the adapter `uri` names (default tag: current) into `destination`, verified."""
    where = Reference.parse(uri)
    if destination.exists() and any(destination.iterdir()):
        raise BadInputError(f"{destination}: not empty; remove it or pull into a new directory")
    registry = registry or Registry(where.registry, plain_http=plain_http)
    reference = where.digest or where.tag or CURRENT_TAG
    found = registry.fetch_manifest(where.repository, reference)
    if found is None:
        raise BadInputError(f"{uri}: no such manifest ({reference}) in {where.repository_uri}")
    manifest, manifest_digest = found
    if manifest.get("artifactType") != ADAPTER_ARTIFACT_TYPE:
        raise BadInputError(
            f"{uri}: artifactType {manifest.get('artifactType')!r}, not {ADAPTER_ARTIFACT_TYPE}: "
            "not an adapter promoted by dpo-operator"
        )
    annotations = _annotations(manifest)
    adapter_digest = annotations.get(ADAPTER_DIGEST, "")
    gate = _passing_gate_report(registry, where, manifest_digest, adapter_digest)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    try:
        for layer in manifest.get("layers", []):
            descriptor = Descriptor.of(layer, uri)
            path = staging / _safe_title(descriptor.title, uri)
            path.parent.mkdir(parents=True, exist_ok=True)
            registry.fetch_blob(where.repository, descriptor, path)
        if not (staging / MANIFEST).exists():
            raise BadInputError(f"{uri}: the artifact has no {MANIFEST}; it is not an adapter")
        found_digest = verify_manifest(staging)
        if found_digest != adapter_digest:
            raise BadInputError(
                f"{uri}: the files' digest is {found_digest}, but the manifest's {ADAPTER_DIGEST} "
                f"annotation says {adapter_digest!r}: the artifact was altered"
            )
        if destination.exists():
            destination.rmdir()
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PulledAdapter(
        directory=destination,
        reference=where.at(manifest_digest),
        version=annotations.get(VERSION, ""),
        adapter_digest=adapter_digest,
        base_model=annotations.get(BASE_MODEL, ""),
        gate=gate,
    )


def _passing_gate_report(
    registry: Registry, where: Reference, subject: str, adapter_digest: str
) -> GateReport:
    """The gate report attached to `subject` that passed `adapter_digest`, or a refusal."""
    verdicts = []
    for referrer in registry.referrers(where.repository, subject):
        if referrer.get("artifactType") != GATE_REPORT_ARTIFACT_TYPE:
            continue
        found = registry.fetch_manifest(where.repository, str(referrer.get("digest")))
        if found is None or found[0].get("subject", {}).get("digest") != subject:
            continue
        layers = found[0].get("layers", [])
        if not layers:
            continue
        descriptor = Descriptor.of(layers[0], f"{where} gate report")
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / EVAL_REPORT_TITLE
            registry.fetch_blob(where.repository, descriptor, path)
            report = GateReport.model_validate_json(path.read_text())
        if report.adapter_digest == adapter_digest and report.verdict == "Passed":
            return report
        verdicts.append(f"{report.verdict} for {report.adapter_digest}")
    raise BadInputError(
        f"{where.at(subject)}: no gate report passed adapter {adapter_digest}"
        + (f" (found: {', '.join(verdicts)})" if verdicts else " (no gate report is attached)")
        + "; only adapters promoted after a passing eval gate can be pulled"
    )


def _safe_title(title: str | None, uri: str) -> str:
    """A layer's file name, refused unless it stays inside the destination."""
    if not title or title.startswith("/") or "\\" in title or ".." in Path(title).parts:
        raise BadInputError(f"{uri}: layer title {title!r} is not a relative file name")
    return title
