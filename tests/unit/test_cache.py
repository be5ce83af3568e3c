"""The operator's cache lags behind its own writes: what it created, deleted and wrote since is
remembered until the watch shows it, so a reconcile on the older cache does not redo it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from dpo_operator.controller.expectations import Expectations
from dpo_operator.controller.workqueue import WorkQueue
from dpo_operator.core.lifecycle import ChildJob, Create, Observed, decide
from dpo_operator.core.render import render_child
from dpo_operator.core.resolve import resolve

from tests.conftest import job_with
from tests.unit.test_lifecycle import NOW
from tests.unit.test_lifecycle import job as initialized_job

KEY = ("ml", "demo")


def body(revision: int, status: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "demo", "resourceVersion": str(revision)}, "status": status}


def test_a_job_created_but_not_yet_in_the_cache_is_not_created_again() -> None:
    job = initialized_job()
    expected = Expectations()
    for kind in ("config", "service", "train"):
        expected.created_child(KEY, render_child(resolve(job), kind, 1))
    jobs, names = expected.with_children(KEY, (), set())
    assert [j.name for j in jobs] == ["demo-train-1"]
    assert {"demo-config", "demo-nodes"} <= names
    decision = decide(
        job,
        Observed(now=NOW, jobs=jobs, has_config_map="demo-config" in names, has_service=True),
    )
    assert not any(isinstance(action, Create) for action in decision.actions)


def test_once_the_cache_shows_a_child_the_cache_is_believed() -> None:
    expected = Expectations()
    expected.created_child(KEY, render_child(resolve(job_with()), "train", 1))
    seen = ChildJob("demo-train-1", "train", 1, False, "Complete")
    jobs, _ = expected.with_children(KEY, (seen,), set())
    assert jobs == (seen,)


def test_a_deleted_job_still_in_the_cache_counts_as_going() -> None:
    expected = Expectations()
    expected.deleted_job(KEY, "demo-train-1")
    seen = ChildJob("demo-train-1", "train", 1, False, "Failed")
    (job,) = expected.with_children(KEY, (seen,), set())[0]
    assert job.deleting


def test_the_status_written_is_decided_from_until_the_watch_brings_it_back() -> None:
    expected = Expectations()
    expected.wrote_status(KEY, 12, {"attempt": 2})
    assert expected.with_status(KEY, body(11, {"attempt": 1}))["status"] == {"attempt": 2}
    newer = body(13, {"attempt": 2, "phase": "Pending"})
    assert expected.with_status(KEY, newer) is newer
    assert expected.with_status(KEY, body(11, {"attempt": 1}))["status"] == {"attempt": 1}


def test_the_work_queue_never_gives_one_dpojob_to_two_workers() -> None:
    async def scenario() -> list[tuple[str, str]]:
        queue = WorkQueue()
        queue.wake(KEY)
        queue.wake(KEY)  # queued once
        taken = [await queue.take()]
        queue.wake(KEY)  # woken while busy: again once it is done
        assert queue.ready.empty()
        queue.done(KEY)
        taken.append(await asyncio.wait_for(queue.take(), 1))
        queue.done(KEY)
        return taken

    assert asyncio.run(scenario()) == [KEY, KEY]


def test_a_dpojob_due_at_several_times_is_woken_at_the_soonest_once() -> None:
    async def scenario() -> tuple[float, int]:
        queue = WorkQueue()
        ticking = asyncio.create_task(queue.tick())
        start = time.monotonic()
        for delay in (0.3, 0.05, 0.15):
            queue.wake_at(KEY, start + delay)
        await queue.take()
        woken_after = time.monotonic() - start
        queue.done(KEY)
        await asyncio.sleep(0.4)  # past the later times
        ticking.cancel()
        return woken_after, queue.ready.qsize()

    woken_after, woken_again = asyncio.run(scenario())
    assert woken_after < 0.14
    assert woken_again == 0
