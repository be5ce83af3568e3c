"""kopf wiring that every controller shares: startup (the runtime, kopf's and glibc's settings),
login, cleanup. Each resource's controller registers its own watch handlers (`dpojob`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from dpo_operator.controller.memory import M_ARENA_MAX, MALLOC_ARENAS, glibc
from dpo_operator.controller.runtime import WORKERS, Runtime, runtime_of


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf keeps a diff base of every watched object for change handlers (on.create, on.update,
    ...) and builds one, a deep copy of the body, on every watch event. The operator has none
    (only watch events and indexes), so it needs none: in a burst the copies were a tenth of the
    operator's CPU."""

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.level = logging.WARNING  # kopf's own log lines are not Events
    settings.watching.server_timeout = 300
    # kopf keeps a worker, and the last body it saw, for each object with recent events: 5 s by
    # default. A burst of creates then holds thousands of bodies at once, and the heap never
    # shrinks back (the operator's resident memory is its high-water mark).
    settings.batching.idle_timeout = 0.5
    settings.persistence.diffbase_storage = NoDiffBase()
    memo.runtime = Runtime.start(memo.render_settings)
    libc = glibc()
    if libc is not None:
        # Left to itself, glibc gives threads up to 8 heaps per core, and each keeps the memory
        # its thread freed: resident memory that grows with the worker threads, not the load.
        libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    # Metrics scrapes (a blocking read with a deadline) run in these threads.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="scrape")
    )


@kopf.on.login()
async def login(
    settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> kopf.ConnectionInfo | None:
    """kopf's credentials, which the operator's own requests use too: the pod's service account,
    else the Kubernetes client's login where it is installed (it runs kubeconfig exec plugins),
    else the kubeconfig's token or client certificate."""
    info = (
        kopf.login_with_service_account(settings=settings, logger=logger)
        or kopf.login_via_client(settings=settings, logger=logger)
        or kopf.login_with_kubeconfig(settings=settings, logger=logger)
    )
    if info is not None:
        await runtime_of(memo).executor.api.use(info)
    return info


@kopf.on.cleanup()
async def stop_workers(memo: kopf.Memo, **_: Any) -> None:
    runtime = runtime_of(memo)
    for task in [*runtime.tasks, *runtime.tasks_of_sweeps]:
        task.cancel()
    await runtime.executor.api.close()
