"""`dpo run FILE`: a DPOJob on this machine, through the same lifecycle as the operator.

`lifecycle.decide` decides; `LocalExecutor` carries its decisions out with processes instead of
pods. A Job is one process per pod, started as a kubelet would start the rendered container:
the same command and env, the completion index as the rank, rank 0 at 127.0.0.1, the /etc/dpo
files in the run directory, each pod with its own /tmp, PersistentVolumeClaims mapped to local
directories. So phases, group restarts, the gate, manual approval, promotion, suspend and
deadlines behave here as they do on a cluster.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from dpo_contract.config import TrainerConfig
from dpo_contract.pod import (
    ACCELERATE_CONFIG_FILE,
    ACCELERATE_CONFIG_PATH,
    EXIT_BAD_INPUT,
    EXIT_GATE_REJECTED,
    EXIT_WRONG_ENVIRONMENT,
    TRAINER_CONFIG_PATH,
)

from dpo_operator.api import TERMINAL_PHASES, DPOJob, DPOJobStatus
from dpo_operator.core.lifecycle import (
    APPROVE_ANNOTATION,
    ChildJob,
    Component,
    Create,
    Delete,
    DeleteChildren,
    JobState,
    Observed,
    Suspend,
    Update,
    decide,
)
from dpo_operator.core.policy import refusals
from dpo_operator.core.render import Manifest, render_child, render_config_map, trainer_config
from dpo_operator.core.resolve import resolve
from dpo_operator.core.settings import Settings
from dpo_operator.local.kubelet import (
    SHOWN_OUTPUT,
    LocalPod,
    PodStarter,
    free_port,
    kubelet_process,
    local_gpus,
    start_container,
)

EXIT_FAILED = 1
# Trainer output worth showing live; the rest goes to the run's log files.
# How often the run is looked at while its processes work (deadlines, metrics, approval).
POLL_SECONDS = 0.2


@dataclass
class LocalOptions:
    workdir: Path
    volumes: dict[str, Path] = field(default_factory=dict)
    metrics_port: int | None = None
    approve: bool = False
    cpu: bool = False


@dataclass
class LocalJob:
    """A Job: the processes of its pods, kept as the Job controller keeps them. A failed pod is
    replaced while `backoffLimit` allows and no podFailurePolicy rule fails the Job on its exit
    code; once the Job has failed, the pods still running are stopped (SIGTERM: they
    checkpoint). A suspended Job has no pods."""

    name: str
    component: Component
    attempt: int
    manifest: Manifest
    pods: list[LocalPod] = field(default_factory=list)
    suspended: bool = False
    deleting: bool = False
    failed: bool = False
    seen_failures: set[str] = field(default_factory=set)

    @property
    def backoff_limit(self) -> int:
        return int(self.manifest["spec"].get("backoffLimit", 6))

    @property
    def fail_job_exit_codes(self) -> set[int]:
        rules = self.manifest["spec"].get("podFailurePolicy", {}).get("rules", [])
        return {
            code
            for rule in rules
            if rule["action"] == "FailJob" and "onExitCodes" in rule
            for code in rule["onExitCodes"]["values"]
        }

    def new_failures(self) -> list[LocalPod]:
        """Pods that failed since the last look, to be replaced or to fail the Job."""
        fresh = [
            pod
            for pod in self.pods
            if pod.name not in self.seen_failures and pod.observed().phase == "Failed"
        ]
        self.seen_failures.update(pod.name for pod in fresh)
        return fresh

    def state(self) -> JobState:
        if self.suspended:
            return "Pending"
        if self.failed:
            self.stop()
            return "Failed" if self.finished else "Running"
        latest = {pod.rank: pod for pod in self.pods}  # each rank's newest pod
        if latest and all(p.observed().phase == "Succeeded" for p in latest.values()):
            return "Complete"
        return "Running" if self.pods else "Pending"

    def stop(self) -> None:
        for pod in self.pods:
            if pod.process.poll() is None:
                pod.process.send_signal(signal.SIGTERM)

    @property
    def finished(self) -> bool:
        return all(pod.process.poll() is not None for pod in self.pods)

    def observed(self) -> ChildJob:
        return ChildJob(
            name=self.name,
            component=self.component,
            attempt=self.attempt,
            suspended=self.suspended,
            state=self.state(),
            deleting=self.deleting,
            pods=tuple(pod.observed() for pod in self.pods),
        )


class LocalExecutor:
    """Carries out the lifecycle's actions on this machine (an `Executor` whose context is the
    DPOJob); observes what it started."""

    def __init__(
        self,
        job: DPOJob,
        options: LocalOptions,
        out: IO[str],
        start_pod: PodStarter = start_container,
    ) -> None:
        self.options = options
        self.out = out
        self.start_pod = start_pod
        self.workdir = options.workdir
        self.settings = Settings(cpu=options.cpu)
        self.resolved = resolve(job, self.settings)
        self.claim_paths = {
            claim: str(options.volumes.get(claim, self.workdir / "volumes" / claim).resolve())
            for claim in self.resolved.claims
        }
        # Any two runs on one machine at once: each rank 0 serves /metrics on a port of its own.
        self.metrics_port = options.metrics_port or free_port()
        self.config = self._trainer_config()
        self.files = {
            TRAINER_CONFIG_PATH: self.workdir / "trainer.json",
            ACCELERATE_CONFIG_PATH: self.workdir / "accelerate.yaml",
        }
        self.jobs: dict[str, LocalJob] = {}
        self.master_ports: dict[str, int] = {}
        self.has_files = False
        self._readers: list[threading.Thread] = []

    def _trainer_config(self) -> TrainerConfig:
        config = trainer_config(self.resolved, self.claim_paths)
        return config.model_copy(update={"metrics_port": self.metrics_port})

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # -- observe ---------------------------------------------------------------------------

    def observe(self) -> Observed:
        for name in [n for n, j in self.jobs.items() if j.deleting and j.finished]:
            del self.jobs[name]
        for local in self.jobs.values():
            self._replace_failed_pods(local)
        return Observed(
            now=datetime.now(UTC),
            jobs=tuple(job.observed() for job in self.jobs.values()),
            has_config_map=self.has_files,
            has_service=self.has_files,
        )

    def running(self) -> bool:
        return any(not job.finished for job in self.jobs.values())

    def wait(self, seconds: float) -> None:
        """Until a process ends or `seconds` pass."""
        deadline = time.monotonic() + seconds
        before = {id(p.process): p.process.poll() for j in self.jobs.values() for p in j.pods}
        while time.monotonic() < deadline:
            now = {id(p.process): p.process.poll() for j in self.jobs.values() for p in j.pods}
            if now != before:
                return
            time.sleep(0.05)

    # -- act -------------------------------------------------------------------------------

    def create(self, job: DPOJob, action: Create) -> None:
        if action.kind == "network-policy":
            return  # processes on one machine: no network to fence
        if action.kind == "config" or action.kind == "service":
            self._write_files()
            return
        component: Component = action.kind
        manifest = render_child(self.resolved, component, action.attempt)
        name = manifest["metadata"]["name"]
        local = LocalJob(name, component, action.attempt, manifest)
        self.jobs[name] = local
        self._announce(component)
        self.master_ports[name] = free_port()
        for rank in range(int(manifest["spec"].get("completions", 1))):
            self._start_pod(local, rank)

    def _start_pod(self, local: LocalJob, rank: int) -> None:
        tries = sum(pod.rank == rank for pod in local.pods)
        pod = f"{local.name}-{rank}" + (f"-retry{tries}" if tries else "")
        termination = self.workdir / "logs" / f"{pod}.termination.json"
        termination.unlink(missing_ok=True)
        command, env = kubelet_process(
            local.manifest["spec"]["template"]["spec"]["containers"][0],
            rank,
            self.master_ports[local.name],
            self.files,
            termination,
            self.workdir / "pods" / pod / "tmp",
            self.say,
        )
        process = self.start_pod(command, env, local.component, local.attempt, rank)
        self._follow(process, self.workdir / "logs" / f"{pod}.log", show=rank == 0)
        local.pods.append(LocalPod(pod, rank, process, termination))

    def _replace_failed_pods(self, local: LocalJob) -> None:
        """What the Job controller does with a failed pod: replace it, or fail the Job."""
        for pod in local.new_failures():
            if local.failed or local.deleting or local.suspended:
                continue
            code = pod.process.returncode
            retries = len(local.seen_failures)
            if code in local.fail_job_exit_codes or retries > local.backoff_limit:
                local.failed = True
                continue
            self.say(
                f"  {pod.name} exited {code}; the Job retries it ({retries}/{local.backoff_limit})"
            )
            self._start_pod(local, pod.rank)

    def _announce(self, component: Component) -> None:
        if component != "train":
            return
        layout = self.config.distributed
        self.say(
            f"  {layout.strategy} on {layout.nnodes} pod(s) x {layout.nproc_per_node} "
            f"{layout.device} process(es); live metrics at "
            f"http://127.0.0.1:{self.config.metrics_port}/metrics"
        )

    def update(self, job: DPOJob, action: Update) -> None:
        # The spec does not change during a run; the plan does once the initializer counted.
        self.resolved = resolve(job, self.settings)
        self.config = self._trainer_config()
        self.has_files = False
        self._write_files()

    def delete(self, job: DPOJob, action: Delete) -> None:
        self._delete(action.job)

    def suspend(self, job: DPOJob, action: Suspend) -> None:
        local = self.jobs.get(action.job)
        if local is not None and action.suspend:
            local.stop()  # the pods checkpoint and go; resuming starts a new attempt's pods
            local.suspended = True

    def delete_children(self, job: DPOJob, action: DeleteChildren) -> None:
        for name in list(self.jobs):
            self._delete(name)

    def _delete(self, name: str) -> None:
        local = self.jobs.get(name)
        if local is not None:
            local.stop()
            local.deleting = True

    def _write_files(self) -> None:
        if self.has_files:
            return
        for path in self.claim_paths.values():
            Path(path).mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.files[TRAINER_CONFIG_PATH].write_text(
            self.config.model_dump_json(by_alias=True, indent=2) + "\n"
        )
        self.files[ACCELERATE_CONFIG_PATH].write_text(
            render_config_map(self.resolved)["data"][ACCELERATE_CONFIG_FILE]
        )
        self.has_files = True

    def _follow(self, process: subprocess.Popen[str], log: Path, *, show: bool) -> None:
        """Copy the pod's output to its log file; show rank 0's progress lines live."""

        def copy() -> None:
            assert process.stdout is not None
            with log.open("w") as sink:
                for line in process.stdout:
                    sink.write(line)
                    if show and SHOWN_OUTPUT.search(line):
                        self.say(f"  {line.rstrip()}")

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        self._readers.append(reader)

    def close(self) -> None:
        """Stop whatever still runs (Ctrl-C, or the run stopped waiting) and flush the logs."""
        for job in self.jobs.values():
            job.stop()
        for job in self.jobs.values():
            for pod in job.pods:
                pod.process.wait()
        for reader in self._readers:
            reader.join(timeout=5)


@dataclass(frozen=True)
class LocalRun:
    """Where `dpo run` stopped: the DPOJob with its last status, and where its files are."""

    job: DPOJob
    status: DPOJobStatus
    workdir: Path
    artifacts_dir: Path
    say: Callable[[str], None]


def run(
    job: DPOJob,
    options: LocalOptions,
    out: IO[str] = sys.stdout,
    confirm: Callable[[str], bool] | None = None,
    start_pod: PodStarter = start_container,
    summarize: Callable[[LocalRun], None] | None = None,
) -> int:
    """Run `job` here through the lifecycle; print progress (and, with `summarize`, a summary
    where it stopped); return an exit code.

    Stops when the run ends, or when it can only wait for someone: a manual promotion without
    approval (`--approve`), a suspended job.
    """
    gpus = local_gpus()
    if job.spec.resources.gpus_per_node > gpus and not options.cpu:
        print(
            f"spec.resources.gpusPerNode is {job.spec.resources.gpus_per_node} but this machine "
            f"has {gpus} GPU(s); run with --cpu to train on the CPU, or lower gpusPerNode",
            file=out,
        )
        return EXIT_BAD_INPUT
    if options.approve:  # approved once the gate passed, as a person would
        confirm = approve_any
    executor = LocalExecutor(job, options, out, start_pod)
    refused = refusals(job, executor.settings)
    if refused:
        print("\n".join(refused), file=out)
        return EXIT_BAD_INPUT
    executor.say(f"DPOJob {job.namespace}/{job.name}: run directory {executor.workdir}")
    shown_phase = None
    try:
        while True:
            decision = decide(job, executor.observe())
            for event in decision.events:
                # The lifecycle's events, as `kubectl describe` would list them.
                executor.say(f"{event.type}  {event.reason}: {event.message}")
            phase = decision.status.phase
            if phase != shown_phase:  # what `kubectl get dpo -w` shows
                executor.say(f"[{phase}] {decision.status.message or ''}".rstrip())
                shown_phase = phase
            job = job.model_copy(update={"status": decision.status})
            for action in decision.actions:
                action.carry_out(executor, job)
            if phase in TERMINAL_PHASES or (phase == "Suspended" and not executor.running()):
                break
            if phase == "AwaitingApproval":
                question = f"Promote the gated adapter to {job.spec.promotion.target}?"  # type: ignore[union-attr]
                if confirm is None or not confirm(question):
                    break
                job = approved(job)
                continue
            executor.wait(POLL_SECONDS)
    finally:
        executor.close()
    status = job.status or DPOJobStatus()
    if summarize is not None:
        artifacts_dir = Path(executor.config.artifacts_dir)
        summarize(LocalRun(job, status, executor.workdir, artifacts_dir, executor.say))
    return exit_code(status)


def approve_any(question: str) -> bool:
    return True


def approved(job: DPOJob) -> DPOJob:
    """`job` with the approval a person adds with kubectl once the gate passed: the digest of
    the adapter it judged."""
    evaluation = job.status.evaluation if job.status else None
    digest = (evaluation.adapter_digest if evaluation else None) or ""
    annotations = {**job.metadata.annotations, APPROVE_ANNOTATION: digest}
    return job.model_copy(
        update={"metadata": job.metadata.model_copy(update={"annotations": annotations})}
    )


def exit_code(status: DPOJobStatus) -> int:
    """`dpo run`'s exit code for where the run stopped."""
    if status.phase == "Rejected":
        return EXIT_GATE_REJECTED
    if status.phase != "Failed":
        return 0
    failed = next((c for c in status.conditions if c.type == "Failed"), None)
    reason = failed.reason if failed else ""
    return {"BadInput": EXIT_BAD_INPUT, "WrongEnvironment": EXIT_WRONG_ENVIRONMENT}.get(
        reason, EXIT_FAILED
    )
