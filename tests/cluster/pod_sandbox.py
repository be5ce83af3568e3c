"""A pod's container, as `PodRunner` starts it: run inside the pod's own network, mount, UTS and
PID namespaces, this forks the container's PID 1, which mounts the pod's volumes at their paths,
takes the pod's hostname and becomes the container's process. This process stays outside as its
runtime: it passes SIGTERM on to PID 1 and exits with its status (128 + N when a signal N killed
it); when PID 1 dies, the kernel kills whatever else of the container is left. A standalone
script (no imports from the repo), so a mount over /tmp cannot hide it.

    python pod_sandbox.py SPEC.json
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path


def mount(source: str, target: str, kind: str, read_only: bool, size: str | None) -> None:
    if kind == "file":
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).touch(exist_ok=True)
    else:
        Path(target).mkdir(parents=True, exist_ok=True)
    if kind == "tmpfs":
        options = ["-o", f"size={size}"] if size else []
        subprocess.run(["mount", "-t", "tmpfs", *options, "tmpfs", target], check=True)
    else:
        subprocess.run(["mount", "--bind", source, target], check=True)
    if read_only:
        subprocess.run(["mount", "-o", "remount,bind,ro", target], check=True)


def container(spec: dict) -> None:  # type: ignore[type-arg]
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: never outlive the runtime
    subprocess.run(["mount", "-t", "proc", "proc", "/proc"], check=True)
    for m in spec["mounts"]:
        mount(m["source"], m["target"], m["kind"], m["readOnly"], m.get("size"))
    socket.sethostname(spec["hostname"])
    os.chdir(spec["workingDir"])
    os.execvpe(spec["command"][0], spec["command"], spec["env"])


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    init = os.fork()
    if init == 0:
        try:
            container(spec)
        finally:
            os._exit(127)  # exec failed; the traceback is in the log
    signal.signal(signal.SIGTERM, lambda *_: os.kill(init, signal.SIGTERM))
    _, status = os.waitpid(init, 0)
    sys.exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


if __name__ == "__main__":
    main()
