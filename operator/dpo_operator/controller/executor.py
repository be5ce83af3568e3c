"""The Kubernetes executor: carries out the lifecycle's actions (creates, updates, deletes and
suspends children) with the operator's own API requests, and writes status."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import kopf

from dpo_operator.api import GROUP, PLURAL, VERSION, DPOJob
from dpo_operator.controller.cache import controller_uid
from dpo_operator.controller.client import (
    ApiError,
    KubeAPI,
    job_path,
    manifest_path,
    object_path,
    resource_version,
)
from dpo_operator.controller.expectations import Expectations
from dpo_operator.core.lifecycle import Create, Delete, DeleteChildren, Suspend, Update
from dpo_operator.core.names import config_map_name, service_name
from dpo_operator.core.render import Manifest, render_child
from dpo_operator.core.resolve import ResolvedJob, resolve
from dpo_operator.core.settings import Settings
from dpo_operator.core.validate import parse_dpojob

log = logging.getLogger("dpo_operator")


class ChildRefusedError(Exception):
    """The API server will not take a child as rendered (422, an admission policy), or its name
    is taken by an object this DPOJob does not own: retrying cannot help."""


@dataclass(frozen=True)
class Reconciling:
    """What an action is carried out for: the DPOJob, resolved once per reconcile, and the uids
    of the children it owns, by name (a delete names the uid it means, so it can never remove
    an object someone else has since created under that name)."""

    resolved: ResolvedJob
    uids: Mapping[str, str]

    @property
    def job(self) -> DPOJob:
        return self.resolved.job


@dataclass
class KubernetesExecutor:
    """Creates, updates, deletes and suspends a DPOJob's children and writes its status; an
    `Executor` of the lifecycle (each method returns the awaitable that does it)."""

    api: KubeAPI
    settings: Settings
    validated: set[tuple[str, int]] = field(default_factory=set)
    expected: Expectations = field(default_factory=Expectations)
    # Namespaces whose NetworkPolicy this operator created or is creating: the DPOJobs of a
    # burst in one namespace would otherwise each try before the watch shows the first.
    fenced: set[str] = field(default_factory=set)

    def parse(self, body: Mapping[str, Any]) -> DPOJob:
        """The DPOJob; its rules and memory plan are checked once per generation."""
        metadata = body["metadata"]
        generation = (metadata["uid"], int(metadata.get("generation") or 0))
        job = parse_dpojob(
            body,
            check_rules=generation not in self.validated,
            default_output=self.settings.default_output,
        )
        self.validated.add(generation)
        return job

    def resolve(self, job: DPOJob, uids: Mapping[str, str]) -> Reconciling:
        return Reconciling(resolve(job, self.settings), uids)

    async def create(self, context: Reconciling, action: Create) -> None:
        job = context.job
        if action.kind != "network-policy":
            manifest = render_child(context.resolved, action.kind, action.attempt)
            await self._create(job, manifest)
            self.expected.created_child((job.namespace, job.name), manifest)
            return
        if job.namespace in self.fenced:
            return
        self.fenced.add(job.namespace)
        try:
            await self._create(job, render_child(context.resolved, action.kind, 0))
        except BaseException:
            self.fenced.discard(job.namespace)
            raise

    async def update(self, context: Reconciling, action: Update) -> None:
        manifest = render_child(context.resolved, action.kind, 0)
        patch = {
            "metadata": {"annotations": manifest["metadata"]["annotations"]},
            "data": manifest["data"],
        }
        await self.api.merge_patch(manifest_path(manifest), patch)

    async def delete(self, context: Reconciling, action: Delete) -> None:
        job = context.job
        # A Job created since the cache last looked has no uid here yet: it is ours.
        await self._delete(job_path(job.namespace, action.job), context.uids.get(action.job))
        self.expected.deleted_job((job.namespace, job.name), action.job)

    async def suspend(self, context: Reconciling, action: Suspend) -> None:
        suspend = {"spec": {"suspend": action.suspend}}
        await self.api.merge_patch(job_path(context.job.namespace, action.job), suspend)

    async def delete_children(self, context: Reconciling, action: DeleteChildren) -> None:
        job, uids = context.job, context.uids
        namespace = job.namespace
        children = [
            *((job_path(namespace, name), name) for name in action.jobs),
            (
                object_path("v1", "configmaps", namespace, config_map_name(job)),
                config_map_name(job),
            ),
            (object_path("v1", "services", namespace, service_name(job)), service_name(job)),
        ]
        for path, name in children:
            if name in uids:  # not ours, or gone already: leave it
                await self._delete(path, uids[name])

    async def _create(self, job: DPOJob, manifest: Manifest) -> None:
        kind, metadata = manifest["kind"], manifest["metadata"]
        try:
            await self.api.create(manifest)
        except ApiError as error:
            if error.status in (400, 422):  # the API server (or an admission policy) says no
                raise ChildRefusedError(f"{kind} {metadata['name']}: {error.message}") from error
            if error.status != 409:
                raise
            if kind == "NetworkPolicy":
                return  # one per namespace, shared: another DPOJob created it first
            # Already there: the cache lagged behind an earlier create of ours, or it is
            # somebody else's. Only a conflict costs this one read.
            existing = await self.api.read(manifest)
            owner = controller_uid(kopf.Body(cast(kopf.RawBody, existing)))
            if owner != job.metadata.uid:
                raise ChildRefusedError(
                    f"a {kind} named {metadata['name']} already exists and is not this DPOJob's "
                    f"(its controller: {owner or 'none'}); delete or rename it, or rename the "
                    "DPOJob"
                ) from error
        log.info("[%s] created %s %s", metadata["namespace"], kind, metadata["name"])

    async def _delete(self, path: str, uid: str | None) -> None:
        try:
            await self.api.delete(path, uid)
        except ApiError as error:
            # Gone already, or (409) a different object by now: either way not ours to delete.
            if error.status not in (404, 409):
                raise

    async def write_status(
        self,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
        decided_on: str,
        plural: str = PLURAL,
    ) -> int:
        """Writes status, if the DPOJob (or, by `plural`, DPOSweep) is still at resourceVersion
        `decided_on` (else 409: the status was decided from an older spec or status, and the
        watch brings the newer one); returns the resourceVersion that carries it."""
        # A merge patch: explicit nulls remove fields the state machine cleared.
        patch = {"metadata": {"resourceVersion": decided_on}, "status": status}
        path = object_path(f"{GROUP}/{VERSION}", plural, namespace, name, "status")
        return resource_version(await self.api.merge_patch(path, patch, decode=True))
