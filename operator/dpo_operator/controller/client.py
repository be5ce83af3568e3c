"""The operator's few requests of its own to the Kubernetes API: create, read, patch and delete a
DPOJob's children, and patch a DPOJob's status.

They go over aiohttp, which kopf already runs on, with the credentials kopf logged in with. The
official client would do the same for 58 MiB of resident memory (its generated models), and kopf
imports it whenever it is installed: the operator image does not install it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf

USER_AGENT = "dpo-operator"
# A request that takes longer is as good as failed: the reconcile is tried again.
REQUEST_TIMEOUT_SECONDS = 30.0
MERGE_PATCH = "application/merge-patch+json"

# The plural of each kind the operator writes.
PLURALS = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "Job": "jobs",
    "NetworkPolicy": "networkpolicies",
    "DPOJob": "dpojobs",
}


class ApiError(Exception):
    """The API server said no (`status` is its HTTP status), or could not be reached (0)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def object_path(
    api_version: str,
    plural: str,
    namespace: str,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """The URL path of a namespaced object (or of its collection when `name` is None)."""
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    if name is not None:
        path += f"/{name}"
    if subresource is not None:
        path += f"/{subresource}"
    return path


def manifest_path(manifest: Mapping[str, Any], *, collection: bool = False) -> str:
    """Where `manifest` lives (or, with `collection`, where it is created)."""
    metadata = manifest["metadata"]
    return object_path(
        manifest["apiVersion"],
        PLURALS[manifest["kind"]],
        metadata["namespace"],
        None if collection else metadata["name"],
    )


def job_path(namespace: str, name: str) -> str:
    return object_path("batch/v1", "jobs", namespace, name)


def resource_version(body: Mapping[str, Any]) -> int:
    """An object's resourceVersion as a number. It is opaque to clients in general; the
    kube-apiserver's is etcd's revision, which only grows."""
    return int(body["metadata"]["resourceVersion"])


class KubeAPI:
    """One HTTP session to the API server, replaced whenever kopf logs in again (a rotated
    token, a 401)."""

    def __init__(self, connections: int = 16) -> None:
        # At most this many requests at once. More would not be served sooner: a burst of
        # DPOJobs would all be half-done together, rather than the first ones done first.
        self.connections = connections
        self._server = ""
        self._session: aiohttp.ClientSession | None = None
        self._logged_in = asyncio.Event()

    async def use(self, info: kopf.ConnectionInfo) -> None:
        """Talk to `info.server` with `info`'s credentials from now on."""
        old = self._session
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=info.as_ssl_context(), limit=self.connections),
            headers={**info.as_http_headers(), "User-Agent": USER_AGENT},
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS),
            proxy=info.proxy_url,
            trust_env=info.trust_env,
        )
        self._server = info.server.rstrip("/")
        self._logged_in.set()
        if old is not None:
            await old.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        *,
        decode: bool = True,
    ) -> dict[str, Any]:
        """The decoded response to one request (`{}` unless `decode`: parsing a created Job back
        is most of a create's cost to the operator, and nothing reads it); ApiError for any
        status but 2xx."""
        await self._logged_in.wait()
        session = self._session
        assert session is not None  # set together with _logged_in
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        try:
            async with session.request(
                method, self._server + path, data=data, headers=headers
            ) as response:
                if response.status >= 300:
                    text = await response.text()
                    raise ApiError(response.status, response.reason or "", _message(text))
                # Read to the end either way, so the connection goes back to the pool.
                raw = await response.read()
        except (aiohttp.ClientError, TimeoutError) as error:
            what = str(error) or type(error).__name__
            raise ApiError(0, "Unreachable", f"{method} {path}: {what}") from error
        result: dict[str, Any] = json.loads(raw) if decode and raw else {}
        return result

    async def create(self, manifest: Mapping[str, Any]) -> None:
        path = manifest_path(manifest, collection=True)
        await self.request("POST", path, manifest, decode=False)

    async def read(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """The object now stored under `manifest`'s kind, namespace and name."""
        return await self.request("GET", manifest_path(manifest))

    async def merge_patch(
        self, path: str, patch: Mapping[str, Any], *, decode: bool = False
    ) -> dict[str, Any]:
        """A JSON merge patch: explicit nulls remove fields. The patched object, with `decode`."""
        return await self.request("PATCH", path, patch, MERGE_PATCH, decode=decode)

    async def delete(self, path: str, uid: str | None) -> None:
        """Deletes the object at `path`, in the background (its pods after it), and only if it
        is still the one with `uid`: a 409 says the name has since passed to another object."""
        options: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid:
            options["preconditions"] = {"uid": uid}
        await self.request("DELETE", path, options, decode=False)


def _message(text: str) -> str:
    """The `message` of the API server's Status body, or the body itself."""
    try:
        return str(json.loads(text)["message"])
    except (TypeError, ValueError, KeyError):
        return text.strip()[:500] or "(no message)"
