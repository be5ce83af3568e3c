"""Keeps the operator's resident memory at its load, not at a burst's peak (glibc's heap)."""

from __future__ import annotations

import asyncio
import ctypes
from typing import Any

TRIM_SECONDS = 30.0
# glibc's mallopt parameter for the most heaps (arenas) threads may allocate from.
M_ARENA_MAX = -8
# The event loop's heap and one shared by the worker threads.
MALLOC_ARENAS = 2


def glibc() -> Any | None:
    """glibc, to tune and trim the heap with; None where there is none (musl, macOS)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


async def return_freed_memory() -> None:
    """A burst (a thousand DPOJobs created at once) fills the heap with watch events that are
    freed seconds later, but glibc keeps freed pages mapped, so resident memory would stay at
    the burst's peak. `malloc_trim` gives the free pages back."""
    libc = glibc()
    if libc is None:
        return
    while True:
        await asyncio.sleep(TRIM_SECONDS)
        await asyncio.to_thread(libc.malloc_trim, 0)
