"""A small client of the OCI distribution API (standard library only): blobs, manifests,
the referrers API and its fallback tag, basic or bearer-token auth as the registry asks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any, BinaryIO

from dpo_contract.manifest import sha256_file
from dpo_contract.oci import (
    BINARY_FILE,
    EMPTY_CONFIG,
    EMPTY_CONFIG_DATA,
    IMAGE_INDEX,
    IMAGE_MANIFEST,
    PASSWORD_ENV,
    TITLE,
    USERNAME_ENV,
)
from dpo_contract.pod import BadInputError

MANIFEST_LIMIT = 4 << 20
_CHUNK = 1 << 20
_TIMEOUT_SECONDS = 60.0


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
        self.push_manifest(repository, fallback_tag(subject), canonical_json(index), IMAGE_INDEX)


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


EMPTY_CONFIG_DESCRIPTOR = Descriptor(
    EMPTY_CONFIG, "sha256:" + hashlib.sha256(EMPTY_CONFIG_DATA).hexdigest(), len(EMPTY_CONFIG_DATA)
)


def fallback_tag(digest: str) -> str:
    return digest.replace(":", "-")


def canonical_json(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def sha256_digest(content: bytes) -> str:
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
