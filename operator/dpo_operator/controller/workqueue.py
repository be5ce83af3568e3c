"""The work queue: each DPOJob at most once, never handed to two workers at once."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time

from dpo_operator.controller.cache import Key


class WorkQueue:
    """DPOJobs to reconcile: each at most once in the queue, never by two workers at once, and
    a clock for those that are due at a time."""

    def __init__(self) -> None:
        self.ready: asyncio.Queue[Key] = asyncio.Queue()
        self.queued: set[Key] = set()
        self.busy: set[Key] = set()
        self.again: set[Key] = set()  # woken while busy: reconcile once more after
        self.due: list[tuple[float, Key]] = []  # a heap; entries not in `next_due` are stale
        self.next_due: dict[Key, float] = {}
        self.clock = asyncio.Event()

    def wake(self, key: Key) -> None:
        if key in self.busy:
            self.again.add(key)
        elif key not in self.queued:
            self.queued.add(key)
            self.ready.put_nowait(key)

    def wake_at(self, key: Key, when: float) -> None:
        """Wake `key` at `when` (monotonic), unless it is to be woken sooner already."""
        if self.next_due.get(key, float("inf")) <= when:
            return
        self.next_due[key] = when
        heapq.heappush(self.due, (when, key))
        if self.due[0] == (when, key):
            self.clock.set()  # sooner than what the clock waits for

    async def take(self) -> Key:
        key = await self.ready.get()
        self.queued.discard(key)
        self.busy.add(key)
        return key

    def done(self, key: Key) -> None:
        self.busy.discard(key)
        if key in self.again:
            self.again.discard(key)
            self.wake(key)

    async def tick(self) -> None:
        """Wake each DPOJob when its time comes."""
        while True:
            self.clock.clear()
            now = time.monotonic()
            while self.due and self.due[0][0] <= now:
                when, key = heapq.heappop(self.due)
                if self.next_due.get(key) == when:
                    del self.next_due[key]
                    self.wake(key)
            timeout = self.due[0][0] - now if self.due else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.clock.wait(), timeout)


# How long a create or delete is expected to show in the watch before it is no longer assumed.
