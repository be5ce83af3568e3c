"""One table of DPOJob scenarios for both executors of the lifecycle: the Kubernetes one (the
operator on the real control plane, the test playing kubelet) and the local one (`dpo run`,
scripted processes as pods). Each scenario says how each pod of each Job ends and the phases
the DPOJob must go through; tests/cluster/test_executors.py runs every row through both.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_contract.pod import ENV_TERMINATION_LOG
from dpo_operator.core.lifecycle import Component
from dpo_operator.core.validate import parse_dpojob
from dpo_operator.local.executor import LocalOptions, run

from tests.conftest import example_manifest, set_fields
from tests.reports import BAD_INPUT, GATE_PASSED, GATE_REJECTED, PROMOTED

# What a Job's phase looks like while its pods run: a scripted pod ends only once it was seen.
RUNNING_PHASE: dict[Component, str] = {
    "train": "Training",
    "eval": "Evaluating",
    "promote": "Promoting",
}


@dataclass(frozen=True)
class PodEnd:
    """How one pod ends: its exit code (None: it runs until stopped) and termination message."""

    exit_code: int | None
    message: str = ""


SUCCEEDS: dict[Component, PodEnd] = {
    "train": PodEnd(0),
    "eval": PodEnd(0, GATE_PASSED),
    "promote": PodEnd(0, PROMOTED),
}


@dataclass(frozen=True)
class Scenario:
    name: str
    phases: tuple[str, ...]  # the DPOJob's phases, each change once
    spec: dict[str, Any] = field(default_factory=dict)  # dotted spec paths on the quickstart
    # "train-1": how the successive pods of that Job end (the last repeats); others succeed.
    pods: dict[str, tuple[PodEnd, ...]] = field(default_factory=dict)
    approve: bool = False  # a person approves the promotion when the run awaits it

    def manifest(self, namespace: str) -> dict[str, Any]:
        manifest = set_fields(example_manifest("quickstart"), **self.spec)
        manifest["metadata"]["namespace"] = namespace
        return manifest

    def pod_end(self, component: Component, attempt: int, tried: int) -> PodEnd:
        """How the pod of Job `component-attempt` ends after `tried` earlier pods of it."""
        ends = self.pods.get(f"{component}-{attempt}")
        if not ends:
            return SUCCEEDS[component]
        return ends[min(tried, len(ends) - 1)]


SCENARIOS = [
    Scenario("happy", ("Pending", "Training", "Evaluating", "Promoting", "Succeeded")),
    Scenario(
        "restarted-from-checkpoint",
        ("Pending", "Training", "Pending", "Training", "Evaluating", "Promoting", "Succeeded"),
        pods={"train-1": (PodEnd(137, "OOMKilled"),)},
    ),
    Scenario(
        "restarts-exhausted",
        ("Pending", "Training", "Pending", "Training", "Failed"),
        spec={"runPolicy.maxRestarts": 1},
        pods={"train-1": (PodEnd(1),), "train-2": (PodEnd(1),)},
    ),
    Scenario(
        "bad-input",
        ("Pending", "Training", "Failed"),
        pods={"train-1": (PodEnd(2, BAD_INPUT),)},
    ),
    Scenario(
        "gate-rejected",
        ("Pending", "Training", "Evaluating", "Rejected"),
        pods={"eval-1": (PodEnd(3, GATE_REJECTED),)},
    ),
    Scenario(
        "gate-pod-retried",
        ("Pending", "Training", "Evaluating", "Promoting", "Succeeded"),
        pods={"eval-1": (PodEnd(1, "node lost"), PodEnd(0, GATE_PASSED))},
    ),
    Scenario(
        "manual-approval",
        ("Pending", "Training", "Evaluating", "AwaitingApproval", "Promoting", "Succeeded"),
        spec={"promotion.mode": "manual"},
        approve=True,
    ),
    Scenario(
        "deadline",
        ("Pending", "Training", "Failed"),
        spec={"runPolicy.activeDeadlineSeconds": 4},
        pods={"train-1": (PodEnd(None),)},
    ),
    Scenario("suspended", ("Suspended",), spec={"runPolicy.suspend": True}),
]

# A scripted pod: stays up for argv[1] seconds (forever when "-"), leaves its termination
# message where the kubelet would read it, and exits with argv[2].
_POD = """
import os, sys, time
if sys.argv[1] == "-":
    time.sleep(3600)
time.sleep(float(sys.argv[1]))
with open(os.environ[sys.argv[4]], "w") as log:
    log.write(sys.argv[3])
sys.exit(int(sys.argv[2]))
"""
# Long enough for `dpo run` (it looks every 0.2 s) to see the pod running.
LOCAL_POD_SECONDS = 1.0


def run_locally(scenario: Scenario, workdir: Path) -> tuple[list[str], str]:
    """`dpo run` of the scenario with scripted pods: the phases it went through, its output."""
    tried: dict[tuple[str, int], int] = {}

    def start_pod(
        command: list[str], env: dict[str, str], component: Component, attempt: int, rank: int
    ) -> subprocess.Popen[str]:
        del command
        key = (component, attempt)
        end = scenario.pod_end(component, attempt, tried.get(key, 0))
        tried[key] = tried.get(key, 0) + 1
        seconds = "-" if end.exit_code is None else str(LOCAL_POD_SECONDS)
        argv = [seconds, str(end.exit_code or 0), end.message, ENV_TERMINATION_LOG]
        return subprocess.Popen(
            [sys.executable, "-c", _POD, *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    job = parse_dpojob(scenario.manifest("default"))
    out = io.StringIO()
    run(
        job,
        LocalOptions(workdir=workdir),
        out=out,
        confirm=lambda question: scenario.approve,
        start_pod=start_pod,
    )
    return re.findall(r"^\[(\w+)\]", out.getvalue(), flags=re.M), out.getvalue()
