"""Servers the tests start as processes of their own (SeaweedFS, docker-registry, Kueue): wait
until one answers, and stop it."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable


def wait_until_ready(
    name: str,
    process: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    log: Callable[[], str],
    timeout: float,
) -> None:
    """Poll `ready()` until it holds; fail with the log's tail if the process exits or time
    runs out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited: {log()[-4000:]}")
        if ready():
            return
        time.sleep(0.3)
    raise TimeoutError(f"{name} not ready in {timeout}s: {log()[-4000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL after 10 s."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
