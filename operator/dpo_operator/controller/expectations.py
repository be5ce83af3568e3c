"""What the operator wrote and the watch has not brought back yet."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from dpo_operator.api import PLURAL, SPEC_DIGEST_ANNOTATION
from dpo_operator.controller.cache import Key, SeenPod
from dpo_operator.controller.client import resource_version
from dpo_operator.core.lifecycle import ChildJob
from dpo_operator.core.names import LABEL_ATTEMPT, LABEL_COMPONENT
from dpo_operator.core.render import Manifest

EXPECTATION_SECONDS = 120.0


@dataclass
class Expectations:
    """What this operator wrote and the watch has not brought back yet, per DPOJob (what
    controller-runtime calls expectations). A reconcile that worked from the older cache would
    do it again: create attempt 1 after deciding on attempt 2, or create a child twice."""

    status: dict[Key, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    created: dict[Key, dict[str, tuple[float, ChildJob | None]]] = field(default_factory=dict)
    deleted: dict[Key, dict[str, float]] = field(default_factory=dict)

    def wrote_status(self, key: Key, revision: int, status: dict[str, Any]) -> None:
        self.status[key] = (revision, status)

    def created_child(self, key: Key, manifest: Manifest) -> None:
        metadata = manifest["metadata"]
        child = None
        if manifest["kind"] == "Job":
            child = ChildJob(
                name=metadata["name"],
                component=metadata["labels"][LABEL_COMPONENT],
                attempt=int(metadata["labels"][LABEL_ATTEMPT]),
                suspended=bool(manifest["spec"].get("suspend")),
                state="Pending",
                spec_digest=metadata["annotations"][SPEC_DIGEST_ANNOTATION],
            )
        self.created.setdefault(key, {})[metadata["name"]] = (time.monotonic(), child)

    def deleted_job(self, key: Key, name: str) -> None:
        self.deleted.setdefault(key, {})[name] = time.monotonic()

    def foresaw(self, key: Key, plural: str, body: Mapping[str, Any], seen: object) -> bool:
        """Whether an event shows only what this operator expects: the DPOJob as its last
        status write left it, a child it created as it created it, or a pod that is only
        being created (decide reads pods that run, ended, or cannot start)."""
        if plural == PLURAL:
            mine = self.status.get(key)
            if mine is None or resource_version(body) != mine[0]:
                return False
            del self.status[key]  # the cache has it now
            return True
        if isinstance(seen, SeenPod):
            # A pod that is only being created says nothing new; one that cannot start does.
            return seen.state.phase == "Pending" and not seen.state.waiting_reason
        created = self.created.get(key, {})
        if isinstance(seen, ChildJob):
            return created.get(seen.name, (0.0, None))[1] == seen
        return seen in created  # a config map or service, by name

    def forget(self, key: Key) -> None:
        for kept in (self.status, self.created, self.deleted):
            kept.pop(key, None)

    def with_status(self, key: Key, body: dict[str, Any]) -> dict[str, Any]:
        """The cached DPOJob, with the status this operator last wrote if the cache is older."""
        mine = self.status.get(key)
        if mine is None:
            return body
        revision, status = mine
        if resource_version(body) >= revision:
            del self.status[key]
            return body
        # The object as the write left it: its status, and the resourceVersion the write made.
        metadata = {**body["metadata"], "resourceVersion": str(revision)}
        return {**body, "metadata": metadata, "status": status}

    def with_children(
        self, key: Key, jobs: tuple[ChildJob, ...], others: set[str]
    ) -> tuple[tuple[ChildJob, ...], set[str]]:
        """The cached Jobs and other children's names, with what was created and deleted
        since."""
        now = time.monotonic()
        seen = {job.name for job in jobs} | others
        created = self.created.get(key, {})
        for name in [
            n for n, (at, _) in created.items() if n in seen or now - at > EXPECTATION_SECONDS
        ]:
            del created[name]
        deleted = self.deleted.get(key, {})
        live = {job.name for job in jobs if not job.deleting}
        for name in [
            n for n, at in deleted.items() if n not in live or now - at > EXPECTATION_SECONDS
        ]:
            del deleted[name]
        amended = tuple(replace(j, deleting=True) if j.name in deleted else j for j in jobs)
        amended += tuple(child for _, child in created.values() if child is not None)
        return amended, seen | set(created)
