"""`dpo run FILE`: a DPOJob on this machine, through the same lifecycle as the operator.

`lifecycle.decide` decides; `LocalExecutor` carries its decisions out with processes instead of
pods. A Job is one process per pod, started as a kubelet would start the rendered container:
the same command and env, the completion index as the rank, rank 0 at 127.0.0.1, the /etc/dpo
files in the run directory, each pod with its own /tmp, PersistentVolumeClaims mapped to local
directories. So phases, group restarts, the gate, manual approval, promotion, suspend and
deadlines behave here as they do on a cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

from dpo_trainer.config import (
    ACCELERATE_CONFIG_FILE,
    ACCELERATE_CONFIG_PATH,
    ENV_MASTER_ADDR,
    ENV_MASTER_PORT,
    ENV_TERMINATION_LOG,
    EXIT_BAD_INPUT,
    EXIT_GATE_REJECTED,
    EXIT_WRONG_ENVIRONMENT,
    TRAINER_CONFIG_PATH,
    DistributedRun,
    GateCriterion,
    GateReport,
    TrainingReport,
)

from dpo_operator.api import TERMINAL_PHASES, DPOJob, DPOJobStatus
from dpo_operator.lifecycle import (
    APPROVE_ANNOTATION,
    Action,
    ChildJob,
    Component,
    Create,
    Delete,
    DeleteChildren,
    Event,
    JobState,
    Observed,
    PodState,
    Suspend,
    Update,
    decide,
)
from dpo_operator.policy import refusals
from dpo_operator.render import (
    Manifest,
    Settings,
    claims,
    render_child,
    render_config_map,
    trainer_config,
)

EXIT_FAILED = 1
# Trainer output worth showing live; the rest goes to the run's log files.
_SHOWN = re.compile(r"^step \d|\b(ERROR|WARNING|resuming|gate:|promoted)")
# How often the run is looked at while its processes work (deadlines, metrics, approval).
POLL_SECONDS = 0.2


@dataclass
class LocalOptions:
    workdir: Path
    volumes: dict[str, Path] = field(default_factory=dict)
    metrics_port: int | None = None
    approve: bool = False
    cpu: bool = False


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

    The completion index becomes `rank`, rank 0's DNS name 127.0.0.1 at `master_port`, the
    pod's /etc/dpo files the local `files`, its own /tmp volume the directory `tmp` (pods share
    no disk but their volumes); secrets come from this environment if set.
    """
    values: dict[str, str] = {}
    for entry in container["env"]:
        source = entry.get("valueFrom", {})
        if "fieldRef" in source:  # the only fieldRef rendered: the completion index
            values[entry["name"]] = str(rank)
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
    """Carries out the lifecycle's actions on this machine; observes what it started."""

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
        self.claim_paths = {
            claim: str(options.volumes.get(claim, self.workdir / "volumes" / claim).resolve())
            for claim in claims(job)
        }
        self.settings = Settings(cpu=options.cpu)
        config = trainer_config(job, self.claim_paths, settings=self.settings)
        if options.metrics_port is not None:
            config = config.model_copy(update={"metrics_port": options.metrics_port})
        self.config = config
        self.files = {
            TRAINER_CONFIG_PATH: self.workdir / "trainer.json",
            ACCELERATE_CONFIG_PATH: self.workdir / "accelerate.yaml",
        }
        self.jobs: dict[str, LocalJob] = {}
        self.master_ports: dict[str, int] = {}
        self.has_files = False
        self._readers: list[threading.Thread] = []

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

    def apply(self, job: DPOJob, action: Action) -> None:
        if isinstance(action, Create):
            self._create(job, action)
        elif isinstance(action, Update):
            self._write_files(job)
        elif isinstance(action, Delete):
            self._delete(action.job)
        elif isinstance(action, Suspend):
            local = self.jobs.get(action.job)
            if local is not None and action.suspend:
                local.stop()  # the pods checkpoint and go; resuming starts a new attempt's pods
                local.suspended = True
        elif isinstance(action, DeleteChildren):
            for name in list(self.jobs):
                self._delete(name)

    def _delete(self, name: str) -> None:
        local = self.jobs.get(name)
        if local is not None:
            local.stop()
            local.deleting = True

    def _create(self, job: DPOJob, action: Create) -> None:
        if action.kind == "network-policy":
            return  # processes on one machine: no network to fence
        if action.kind == "config" or action.kind == "service":
            self._write_files(job)
            return
        component: Component = action.kind
        manifest = render_child(job, component, action.attempt, settings=self.settings)
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

    def _write_files(self, job: DPOJob) -> None:
        if self.has_files:
            return
        for path in self.claim_paths.values():
            Path(path).mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.files[TRAINER_CONFIG_PATH].write_text(
            self.config.model_dump_json(by_alias=True, indent=2) + "\n"
        )
        self.files[ACCELERATE_CONFIG_PATH].write_text(
            render_config_map(job, settings=self.settings)["data"][ACCELERATE_CONFIG_FILE]
        )
        self.has_files = True

    def _follow(self, process: subprocess.Popen[str], log: Path, *, show: bool) -> None:
        """Copy the pod's output to its log file; show rank 0's progress lines live."""

        def copy() -> None:
            assert process.stdout is not None
            with log.open("w") as sink:
                for line in process.stdout:
                    sink.write(line)
                    if show and _SHOWN.search(line):
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


def run(
    job: DPOJob,
    options: LocalOptions,
    out: IO[str] = sys.stdout,
    confirm: Callable[[str], bool] | None = None,
    start_pod: PodStarter = start_container,
) -> int:
    """Run `job` here through the lifecycle; print progress and a summary; return an exit code.

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
    if options.approve:
        job = approved(job)
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
                _report(executor, event)
            phase = decision.status.phase
            if phase != shown_phase:  # what `kubectl get dpo -w` shows
                executor.say(f"[{phase}] {decision.status.message or ''}".rstrip())
                shown_phase = phase
            for action in decision.actions:
                executor.apply(job, action)
            job = job.model_copy(update={"status": decision.status})
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
    _summary(executor, job, status)
    return exit_code(status)


def approved(job: DPOJob) -> DPOJob:
    """`job` with the approval annotation a person adds with kubectl."""
    annotations = {**job.metadata.annotations, APPROVE_ANNOTATION: "true"}
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


def _report(executor: LocalExecutor, event: Event) -> None:
    """The lifecycle's events, as `kubectl describe` would list them."""
    executor.say(f"{event.type}  {event.reason}: {event.message}")


def _summary(executor: LocalExecutor, job: DPOJob, status: DPOJobStatus) -> None:
    say = executor.say
    say("")
    say(f"DPOJob {job.namespace}/{job.name}: {status.phase}")
    if status.message:
        say(f"  {status.message}")
    if status.phase == "AwaitingApproval":
        say(
            "  promotion is manual: run again with --approve to promote (training is not "
            "repeated; the gate is re-checked)"
        )
    train_report = Path(executor.config.artifacts_dir) / "train.json"
    if train_report.exists():
        summary = TrainingReport.model_validate_json(train_report.read_text())
        metrics = summary.metrics
        say(
            f"training   step {summary.step}  loss {metrics.get('dpo_train_loss', 0):.4f}  "
            f"reward accuracy {metrics.get('dpo_train_reward_accuracy', 0):.3f}  "
            f"margin {metrics.get('dpo_train_reward_margin', 0):.4f}"
        )
        say(f"ran        {describe_distributed_run(summary.distributed)}")
        for signal in summary.health:
            say(f"health     {signal.reason}: {signal.message}")
        if summary.stopped_early is not None:
            stopped = summary.stopped_early
            say(
                f"  stopped early at step {stopped.step} (spec.health.action: stop); the adapter "
                f"is checkpoint-{stopped.kept_step}'s weights"
            )
        plot = plot_rewards(summary.log_history, executor.workdir / "rewards.png")
        if plot:
            say(f"plot       {plot}")
    gate_report = Path(executor.config.artifacts_dir) / "eval.json"
    if status.evaluation is not None and gate_report.exists():
        gate = GateReport.model_validate_json(gate_report.read_text())
        say(f"gate       {gate.verdict}")
        if gate.held_out is not None:
            held = gate.held_out
            say(
                f"  on {held.pairs} pairs ({held.prompts} prompts) held out of {held.source}: "
                f"{held.fraction:.0%} of its prompts, at most {held.max_pairs} pairs"
            )
        for criterion in gate.criteria:
            say(f"  {describe_criterion(criterion, gate.confidence)}")
        if gate.message:
            say(f"  {gate.message}")
    if status.promotion is not None:
        say(f"promoted   {status.promotion.version} -> {status.promotion.uri}")
        if status.promotion.vllm_serve:
            say(f"serve      {status.promotion.vllm_serve}")
            say(f"  or load  {status.promotion.vllm_load_request}")
    say(f"artifacts  {executor.config.artifacts_dir}")


def describe_distributed_run(ran: DistributedRun) -> str:
    """One line from train.json's `distributed`: what the trainer really ran on."""
    kind = ran.distributed_type
    if kind == "FSDP":
        shape = ran.mesh_shape or []
        mesh = "x".join(str(size) for size in shape)
        over = (
            f"a {mesh} mesh ({', '.join(ran.mesh_dims or [])})"
            if len(shape) > 1
            else (f"{mesh} ranks")
        )
        kind = f"FSDP{ran.fsdp_version} sharded over {over}"
    return f"{kind}, world size {ran.world_size}, parameters on {ran.device}"


def plot_rewards(history: list[dict[str, Any]], path: Path) -> Path | None:
    """Reward accuracy and margin over steps (training and held-out) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [e for e in history if "rewards/accuracies" in e]
    held_out = [e for e in history if "eval_rewards/accuracies" in e]
    figure, (accuracy, margin) = plt.subplots(1, 2, figsize=(10, 3.6))
    for entries, prefix, label in ((train, "", "train"), (held_out, "eval_", "held-out")):
        steps = [e["step"] for e in entries]
        accuracy.plot(steps, [e[f"{prefix}rewards/accuracies"] for e in entries], label=label)
        margin.plot(steps, [e[f"{prefix}rewards/margins"] for e in entries], label=label)
    accuracy.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    accuracy.set(title="reward accuracy", xlabel="step", ylim=(0, 1.02))
    margin.set(title="reward margin (chosen - rejected)", xlabel="step")
    for axes in (accuracy, margin):
        axes.legend()
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def expand_references(text: str, values: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, others left as written."""
    return re.sub(r"\$\((\w+)\)", lambda m: values.get(m.group(1), m.group(0)), text)


def describe_criterion(criterion: GateCriterion, confidence: float) -> str:
    """One line: name, estimate, its interval and n, threshold, outcome."""
    if criterion.value is None:
        return f"{criterion.name:18s} {'n/a':>9s}  threshold {criterion.threshold:<8} pass"
    interval = (
        f"[{criterion.low:.4f}, {criterion.high:.4f}] {confidence:.0%} {criterion.method}"
        if criterion.low is not None and criterion.high is not None
        else ""
    )
    outcome = "pass" if criterion.passed else "INCONCLUSIVE" if criterion.inconclusive else "FAIL"
    return (
        f"{criterion.name:18s} {criterion.value:>9.4f}  {interval}  n={criterion.n}  "
        f"threshold {criterion.threshold:<8} {outcome}"
    )
