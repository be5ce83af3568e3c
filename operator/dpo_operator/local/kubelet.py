"""How a rendered pod becomes a process on this machine, as a kubelet would start its container:
the same command and env ($(VAR) expanded), the completion index as the rank, rank 0 at
127.0.0.1, the /etc/dpo files in the run directory, each pod with its own /tmp.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dpo_contract.pod import ENV_MASTER_ADDR, ENV_MASTER_PORT, ENV_TERMINATION_LOG

from dpo_operator.core.lifecycle import Component, PodState
from dpo_operator.core.render import Manifest

SHOWN_OUTPUT = re.compile(r"^step \d|\b(ERROR|WARNING|resuming|gate:|promoted)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def local_gpus() -> int:
    """GPUs nvidia-smi sees here (0 without a driver); torch is not imported by the operator."""
    if shutil.which("nvidia-smi") is None:
        return 0
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return sum(line.startswith("GPU ") for line in listing.stdout.splitlines())


def kubelet_process(
    container: Manifest,
    rank: int,
    master_port: int,
    files: Mapping[str, Path],
    termination_log: Path,
    tmp: Path,
    warn: Callable[[str], None],
) -> tuple[list[str], dict[str, str]]:
    """What a kubelet would start for `container` of pod `rank`, as a local command and env.

    The completion index becomes `rank`, the pod's name its directory's (`tmp`'s parent), its
    node this machine, rank 0's DNS name 127.0.0.1 at `master_port`, the
    pod's /etc/dpo files the local `files`, its own /tmp volume the directory `tmp` (pods share
    no disk but their volumes); secrets come from this environment if set.
    """
    values: dict[str, str] = {}
    for entry in container["env"]:
        source = entry.get("valueFrom", {})
        if "fieldRef" in source:  # the completion index, the pod's name, its node's
            field = source["fieldRef"]["fieldPath"]
            named = {"metadata.name": tmp.parent.name, "spec.nodeName": socket.gethostname()}
            values[entry["name"]] = named.get(field, str(rank))
        elif "secretKeyRef" in source:
            if entry["name"] in os.environ:
                values[entry["name"]] = os.environ[entry["name"]]
            else:
                warn(f"note: secret env {entry['name']} is not set here; left unset")
        else:
            values[entry["name"]] = expand_references(entry["value"], values)
    if ENV_MASTER_ADDR in values:
        values[ENV_MASTER_ADDR] = "127.0.0.1"
        values[ENV_MASTER_PORT] = str(master_port)
    command = [expand_references(part, values) for part in container["command"]]
    for pod_file, local_file in files.items():
        command = [part.replace(pod_file, str(local_file)) for part in command]
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        **values,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        ENV_TERMINATION_LOG: str(termination_log),
        "TMPDIR": str(tmp),
        "PYTHONUNBUFFERED": "1",
    }
    tmp.mkdir(parents=True, exist_ok=True)
    return command, env


class PodStarter(Protocol):
    """Starts the process of one pod: `dpo run` runs the rendered container; the scenario tests
    script one."""

    def __call__(
        self, command: list[str], env: dict[str, str], component: Component, attempt: int, rank: int
    ) -> subprocess.Popen[str]: ...


def start_container(
    command: list[str], env: dict[str, str], component: Component, attempt: int, rank: int
) -> subprocess.Popen[str]:
    del component, attempt, rank
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@dataclass
class LocalPod:
    """One pod: its process and the termination message it leaves."""

    name: str
    rank: int
    process: subprocess.Popen[str]
    termination: Path

    def observed(self) -> PodState:
        code = self.process.poll()
        if code is None:
            return PodState(self.name, "Running")
        message = self.termination.read_text() if self.termination.exists() else ""
        return PodState(self.name, "Succeeded" if code == 0 else "Failed", code, message)


def expand_references(text: str, values: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, others left as written."""
    return re.sub(r"\$\((\w+)\)", lambda m: values.get(m.group(1), m.group(0)), text)
