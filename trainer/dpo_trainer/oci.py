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
import hashlib
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from pathlib import Path
from typing import Any, BinaryIO

from dpo_trainer.config import (
    BadInputError,
    GateReport,
    JobIdentity,
    PromotionResult,
)
from dpo_trainer.manifest import MANIFEST, sha256_file, verify_manifest

SCHEME = "oci://"
ADAPTER_ARTIFACT_TYPE = "application/vnd.dpo.lora-adapter.v1"
GATE_REPORT_ARTIFACT_TYPE = "application/vnd.dpo.gate-report.v1+json"
IMAGE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
IMAGE_INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG_DATA = b"{}"
JSON_FILE = "application/json"
BINARY_FILE = "application/octet-stream"

TITLE = "org.opencontainers.image.title"
CREATED = "org.opencontainers.image.created"
VERSION = "org.opencontainers.image.version"
BASE_MODEL = "dev.dpo.base-model"
ADAPTER_DIGEST = "dev.dpo.adapter-digest"
GATE_VERDICT = "dev.dpo.gate-verdict"
LORA_RANK = "dev.dpo.lora-rank"
JOB = "dev.dpo.job"
JOB_UID = "dev.dpo.job-uid"

CURRENT_TAG = "current"
EVAL_REPORT_TITLE = "eval.json"
USERNAME_ENV = "OCI_USERNAME"
PASSWORD_ENV = "OCI_PASSWORD"
# Registries must take manifests of 4 MiB; a bigger answer is not a manifest.
MANIFEST_LIMIT = 4 << 20
_CHUNK = 1 << 20
_TIMEOUT_SECONDS = 60.0

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REGISTRY_PATTERN = r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?"
REPOSITORY_PATTERN = rf"{_COMPONENT}(?:/{_COMPONENT})*"
REFERENCE_PATTERN = re.compile(
    rf"^oci://(?P<registry>{REGISTRY_PATTERN})/(?P<repository>{REPOSITORY_PATTERN})"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9._-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[a-f0-9]{64}))?$"
)
REFERENCE_HINT = "oci://REGISTRY[:PORT]/REPOSITORY[:TAG][@sha256:DIGEST], lower-case repository"


def is_oci(uri: str) -> bool:
    return uri.startswith(SCHEME)


@dataclass(frozen=True)
class Reference:
    """oci://registry/repository, optionally one tag or digest of it."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, uri: str) -> Reference:
        match = REFERENCE_PATTERN.match(uri)
        if match is None:
            raise BadInputError(f"{uri!r} is not an OCI reference: use {REFERENCE_HINT}")
        return cls(match["registry"], match["repository"], match["tag"], match["digest"])

    @property
    def repository_uri(self) -> str:
        return f"{SCHEME}{self.registry}/{self.repository}"

    def at(self, digest: str) -> str:
        return f"{self.repository_uri}@{digest}"

    def __str__(self) -> str:
        tag = f":{self.tag}" if self.tag else ""
        digest = f"@{self.digest}" if self.digest else ""
        return f"{self.repository_uri}{tag}{digest}"


class RegistryUnavailableError(Exception):
    """The registry could not be reached or failed (5xx): worth retrying, unlike bad input."""


@dataclass
class _Answer:
    status: int
    headers: Message  # case-insensitive, as HTTP header names are
    body: bytes


@dataclass
class Registry:
    """One registry's HTTP API, authenticated as its challenges ask."""

    host: str
    plain_http: bool = False
    username: str | None = field(default_factory=lambda: os.environ.get(USERNAME_ENV))
    password: str | None = field(default_factory=lambda: os.environ.get(PASSWORD_ENV))
    _authorization: dict[str, str] = field(default_factory=dict)  # by challenge scope

    @property
    def base(self) -> str:
        return f"{'http' if self.plain_http else 'https'}://{self.host}"

    def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | BinaryIO | None = None,
        headers: Mapping[str, str] | None = None,
        expect: Iterable[int] = (200,),
        stream_to: BinaryIO | None = None,
        limit: int = MANIFEST_LIMIT,
    ) -> _Answer:
        """One request, answered by one of `expect`; a 401 is answered once with credentials."""
        url = urllib.parse.urljoin(self.base, url)
        scope = _scope_of(url)
        answer = self._send(method, url, body, headers, scope, stream_to, limit)
        if answer.status == 401:
            self._authorization[scope] = self._authenticate(answer.headers, url)
            if hasattr(body, "seek"):
                body.seek(0)  # type: ignore[union-attr]
            answer = self._send(method, url, body, headers, scope, stream_to, limit)
        if answer.status not in tuple(expect):
            raise _refusal(method, url, answer, self)
        return answer

    def _send(
        self,
        method: str,
        url: str,
        body: bytes | BinaryIO | None,
        headers: Mapping[str, str] | None,
        scope: str,
        stream_to: BinaryIO | None,
        limit: int,
    ) -> _Answer:
        request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
        if scope in self._authorization:
            # Unredirected: a blob GET may be sent on to a storage URL that must not see it.
            request.add_unredirected_header("Authorization", self._authorization[scope])
        try:
            with urllib.request.urlopen(request, timeout=_TIMEOUT_SECONDS) as response:
                return _Answer(response.status, response.headers, _read(response, stream_to, limit))
        except urllib.error.HTTPError as error:
            return _Answer(error.code, error.headers, error.read(MANIFEST_LIMIT))
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise RegistryUnavailableError(
                f"{method} {url}: {reason}; check the registry's host and port"
                + ("" if self.plain_http else " (a registry without TLS needs plain HTTP)")
            ) from None

    def _authenticate(self, headers: Message, url: str) -> str:
        challenge = headers.get("WWW-Authenticate", "")
        scheme, _, parameters = challenge.partition(" ")
        basic = None
        if self.username is not None and self.password is not None:
            pair = f"{self.username}:{self.password}".encode()
            basic = "Basic " + base64.b64encode(pair).decode()
        if scheme.lower() not in ("basic", "bearer"):
            raise BadInputError(f"{url}: unknown authentication challenge {challenge!r}")
        if basic is None and scheme.lower() == "basic":
            raise BadInputError(
                f"{url}: the registry asks for credentials; set {USERNAME_ENV} and "
                f"{PASSWORD_ENV} (for a promotion: keys of spec.output.credentialsSecret)"
            )
        if basic is not None and scheme.lower() == "basic":
            return basic
        settings = dict(re.findall(r'(\w+)="([^"]*)"', parameters))
        if "realm" not in settings:
            raise BadInputError(f"{url}: bearer challenge without a realm: {challenge!r}")
        query = urllib.parse.urlencode({k: v for k, v in settings.items() if k != "realm"})
        token_request = urllib.request.Request(f"{settings['realm']}?{query}")
        if basic is not None:
            token_request.add_header("Authorization", basic)
        try:
            with urllib.request.urlopen(token_request, timeout=_TIMEOUT_SECONDS) as response:
                token = json.loads(response.read(MANIFEST_LIMIT))
        except urllib.error.HTTPError as error:
            raise BadInputError(
                f"{settings['realm']}: the registry's token service refused ({error.code}); "
                f"check {USERNAME_ENV} and {PASSWORD_ENV}"
            ) from None
        except (urllib.error.URLError, OSError) as error:
            raise RegistryUnavailableError(f"{settings['realm']}: {error}") from None
        return "Bearer " + str(token.get("token") or token.get("access_token") or "")

    def has_blob(self, repository: str, digest: str) -> bool:
        url = f"/v2/{repository}/blobs/{digest}"
        return self.request("HEAD", url, expect=(200, 404)).status == 200

    def push_blob(self, repository: str, digest: str, size: int, content: bytes | Path) -> None:
        """Upload a blob in one PUT, unless the registry has it already."""
        if self.has_blob(repository, digest):
            return
        started = self.request("POST", f"/v2/{repository}/blobs/uploads/", expect=(202,))
        location = started.headers.get("Location")
        if not location:
            raise BadInputError(f"{self.host}: the upload was started without a Location")
        separator = "&" if "?" in location else "?"
        url = f"{location}{separator}{urllib.parse.urlencode({'digest': digest})}"
        headers = {"Content-Type": BINARY_FILE, "Content-Length": str(size)}
        if isinstance(content, Path):
            with content.open("rb") as stream:
                self.request("PUT", url, body=stream, headers=headers, expect=(201,))
        else:
            self.request("PUT", url, body=content, headers=headers, expect=(201,))

    def fetch_blob(self, repository: str, descriptor: Descriptor, destination: Path) -> None:
        """Download a blob to `destination`, checking its sha256 and size as it streams."""
        with destination.open("wb") as stream:
            self.request(
                "GET",
                f"/v2/{repository}/blobs/{descriptor.digest}",
                stream_to=stream,
                limit=descriptor.size,
            )
        found, size = "sha256:" + sha256_file(destination), destination.stat().st_size
        if (found, size) != (descriptor.digest, descriptor.size):
            raise BadInputError(
                f"{self.host}/{repository}: blob {descriptor.digest} "
                f"({descriptor.title or 'untitled'}) came back as {found}, {size} bytes instead "
                f"of {descriptor.size}: the registry's copy is damaged; promote the adapter again"
            )

    def push_manifest(self, repository: str, reference: str, manifest: bytes, media: str) -> bool:
        """PUT a manifest under a tag or its digest; True if the registry indexed its subject."""
        answer = self.request(
            "PUT",
            f"/v2/{repository}/manifests/{reference}",
            body=manifest,
            headers={"Content-Type": media},
            expect=(201,),
        )
        return "OCI-Subject" in answer.headers

    def fetch_manifest(self, repository: str, reference: str) -> tuple[dict[str, Any], str] | None:
        """The manifest (or index) a tag or digest names, with its digest; None if absent."""
        answer = self.request(
            "GET",
            f"/v2/{repository}/manifests/{reference}",
            headers={"Accept": f"{IMAGE_MANIFEST}, {IMAGE_INDEX}"},
            expect=(200, 404),
        )
        if answer.status == 404:
            return None
        digest = "sha256:" + hashlib.sha256(answer.body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise BadInputError(
                f"{self.host}/{repository}@{reference}: the registry answered a manifest whose "
                f"digest is {digest}: it is not the one asked for"
            )
        try:
            return json.loads(answer.body), digest
        except json.JSONDecodeError:
            raise BadInputError(
                f"{self.host}/{repository}:{reference} is not a JSON manifest"
            ) from None

    def referrers(self, repository: str, digest: str) -> list[dict[str, Any]]:
        """The descriptors of manifests whose subject is `digest`: the referrers API, or the
        fallback tag where the registry has none."""
        answer = self.request(
            "GET",
            f"/v2/{repository}/referrers/{digest}",
            headers={"Accept": IMAGE_INDEX},
            expect=(200, 404),
        )
        if answer.status == 200 and IMAGE_INDEX in answer.headers.get("Content-Type", ""):
            return list(json.loads(answer.body).get("manifests", []))
        index = self.fetch_manifest(repository, fallback_tag(digest))
        return list(index[0].get("manifests", [])) if index else []

    def add_referrer(self, repository: str, subject: str, referrer: dict[str, Any]) -> None:
        """Add a referrer's descriptor to the fallback tag's index of `subject`."""
        current = self.fetch_manifest(repository, fallback_tag(subject))
        index: dict[str, Any] = (
            current[0] if current else {"schemaVersion": 2, "mediaType": IMAGE_INDEX}
        )
        manifests = [m for m in index.get("manifests", []) if m.get("digest") != referrer["digest"]]
        index["manifests"] = [*manifests, referrer]
        self.push_manifest(repository, fallback_tag(subject), _canonical(index), IMAGE_INDEX)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    title: str | None = None

    @classmethod
    def of(cls, data: dict[str, Any], where: str) -> Descriptor:
        try:
            descriptor = cls(
                str(data["mediaType"]),
                str(data["digest"]),
                int(data["size"]),
                (data.get("annotations") or {}).get(TITLE),
            )
        except (KeyError, TypeError, ValueError):
            raise BadInputError(f"{where}: a descriptor lacks mediaType, digest or size") from None
        if not re.fullmatch(r"sha256:[a-f0-9]{64}", descriptor.digest) or descriptor.size < 0:
            raise BadInputError(f"{where}: descriptor digest {descriptor.digest!r} is not sha256")
        return descriptor

    def as_json(self, **extra: Any) -> dict[str, Any]:
        data: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest}
        data["size"] = self.size
        if self.title is not None:
            data["annotations"] = {TITLE: self.title}
        return {**data, **extra}


_EMPTY_CONFIG = Descriptor(
    EMPTY_CONFIG, "sha256:" + hashlib.sha256(EMPTY_CONFIG_DATA).hexdigest(), len(EMPTY_CONFIG_DATA)
)


def fallback_tag(digest: str) -> str:
    return digest.replace(":", "-")


def _canonical(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def _digest(content: bytes) -> str:
    return "sha256:" + hashlib.sha256(content).hexdigest()


def _scope_of(url: str) -> str:
    """Which repository a request is about: a token is good for one repository's scope."""
    match = re.search(r"/v2/(.+?)/(?:blobs|manifests|referrers)/", urllib.parse.urlparse(url).path)
    return match.group(1) if match else ""


def _read(response: Any, stream_to: BinaryIO | None, limit: int) -> bytes:
    if stream_to is None:
        body: bytes = response.read(limit + 1)
        if len(body) > limit:
            raise BadInputError(f"{response.url}: answer over {limit} bytes; not a manifest")
        return body
    written = 0
    for block in iter(lambda: response.read(_CHUNK), b""):
        written += len(block)
        if written > limit:
            raise BadInputError(f"{response.url}: blob longer than its descriptor's {limit} bytes")
        stream_to.write(block)
    return b""


def _refusal(method: str, url: str, answer: _Answer, registry: Registry) -> Exception:
    try:
        errors = json.loads(answer.body).get("errors", [])
        said = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
    except (json.JSONDecodeError, AttributeError):
        said = answer.body[:200].decode(errors="replace").strip()
    what = f"{method} {url}: the registry answered {answer.status}" + (f" ({said})" if said else "")
    if answer.status >= 500:
        return RegistryUnavailableError(what)
    if answer.status in (401, 403):
        return BadInputError(
            f"{what}; the credentials in {USERNAME_ENV}/{PASSWORD_ENV} may not "
            f"{'push to' if method in ('POST', 'PUT') else 'read'} {registry.host}"
        )
    return BadInputError(what)


@dataclass(frozen=True)
class AdapterPush:
    """What a promotion publishes, and under which names."""

    adapter: Path
    adapter_digest: str
    version: str
    served_model_name: str
    report: GateReport
    job: JobIdentity

    @property
    def report_json(self) -> bytes:
        """eval.json as the gate wrote it."""
        return (self.report.model_dump_json(by_alias=True, indent=2) + "\n").encode()


def push_adapter(
    target: str, push: AdapterPush, *, plain_http: bool = False, registry: Registry | None = None
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
        if promoted.get(ADAPTER_DIGEST) == push.adapter_digest:
            return _pointer(where, promoted, current[1], push.job)

    # Both manifests (the adapter's and its gate report's) have the empty config.
    registry.push_blob(repository, _EMPTY_CONFIG.digest, _EMPTY_CONFIG.size, EMPTY_CONFIG_DATA)
    layers = []
    for path in sorted(p for p in push.adapter.rglob("*") if p.is_file()):
        title = str(path.relative_to(push.adapter))
        digest, size = "sha256:" + sha256_file(path), path.stat().st_size
        registry.push_blob(repository, digest, size, path)
        media = JSON_FILE if path.suffix == ".json" else BINARY_FILE
        layers.append(Descriptor(media, digest, size, title).as_json())
    annotations = {
        CREATED: datetime.now(UTC).isoformat(timespec="seconds"),
        VERSION: push.version,
        BASE_MODEL: push.served_model_name,
        ADAPTER_DIGEST: push.adapter_digest,
        GATE_VERDICT: push.report.verdict,
        JOB: f"{push.job.namespace}/{push.job.name}",
        JOB_UID: push.job.uid,
    }
    rank = _lora_rank(push.adapter)
    if rank is not None:
        annotations[LORA_RANK] = str(rank)
    manifest = _artifact_manifest(ADAPTER_ARTIFACT_TYPE, layers, annotations)
    manifest_digest = _digest(manifest)
    registry.push_manifest(repository, push.version, manifest, IMAGE_MANIFEST)
    _push_gate_report(registry, repository, manifest_digest, len(manifest), push)
    registry.push_manifest(repository, CURRENT_TAG, manifest, IMAGE_MANIFEST)
    return _pointer(where, annotations, manifest_digest, push.job)


def _push_gate_report(
    registry: Registry, repository: str, subject: str, subject_size: int, push: AdapterPush
) -> None:
    report_json = push.report_json
    report_digest = _digest(report_json)
    registry.push_blob(repository, report_digest, len(report_json), report_json)
    annotations = {
        CREATED: datetime.now(UTC).isoformat(timespec="seconds"),
        GATE_VERDICT: push.report.verdict,
        ADAPTER_DIGEST: push.report.adapter_digest,
    }
    layer = Descriptor(JSON_FILE, report_digest, len(report_json), EVAL_REPORT_TITLE).as_json()
    manifest = _artifact_manifest(
        GATE_REPORT_ARTIFACT_TYPE,
        [layer],
        annotations,
        subject=Descriptor(IMAGE_MANIFEST, subject, subject_size).as_json(),
    )
    digest = _digest(manifest)
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
        "config": _EMPTY_CONFIG.as_json(data=base64.b64encode(EMPTY_CONFIG_DATA).decode()),
        "layers": layers,
        "annotations": annotations,
    }
    if subject is not None:
        manifest["subject"] = subject
    return _canonical(manifest)


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
