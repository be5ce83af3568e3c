"""`dpo run FILE`: run a DPOJob on this machine: train, gate, promote.

The processes are the rendered pods' containers, started as a kubelet would start them: the
same command and env, with the completion index as the rank, rank 0 at 127.0.0.1, /etc/dpo
files written to the run directory and PersistentVolumeClaims mapped to local directories.
A job of several nodes becomes several local processes talking over gloo.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

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
)

from dpo_operator.api import DPOJob
from dpo_operator.render import (
    Manifest,
    claims,
    render_config_map,
    render_eval_job,
    render_promote_job,
    render_training_job,
    trainer_config,
)

EXIT_FAILED = 1
# Trainer output worth showing live; the rest goes to the run's log files.
_SHOWN = re.compile(r"^step \d|\b(ERROR|WARNING|resuming|gate:|promoted)")


@dataclass
class LocalOptions:
    workdir: Path
    volumes: dict[str, Path] = field(default_factory=dict)
    metrics_port: int | None = None
    approve: bool = False
    cpu: bool = False


@dataclass
class Outcome:
    phase: str
    exit_code: int
    lines: list[str] = field(default_factory=list)


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
            values[entry["name"]] = _expand(entry["value"], values)
    if ENV_MASTER_ADDR in values:
        values[ENV_MASTER_ADDR] = "127.0.0.1"
        values[ENV_MASTER_PORT] = str(master_port)
    command = [_expand(part, values) for part in container["command"]]
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


class LocalRun:
    """One `dpo run`: the run directory, its files, and the processes of each phase."""

    def __init__(self, job: DPOJob, options: LocalOptions, out: IO[str]) -> None:
        self.job = job
        self.options = options
        self.out = out
        self.workdir = options.workdir
        self.claim_paths = {
            claim: str(options.volumes.get(claim, self.workdir / "volumes" / claim).resolve())
            for claim in claims(job)
        }
        config = trainer_config(job, self.claim_paths, cpu=options.cpu)
        if options.metrics_port is not None:
            config = config.model_copy(update={"metrics_port": options.metrics_port})
        self.config = config
        self.files = {
            TRAINER_CONFIG_PATH: self.workdir / "trainer.json",
            ACCELERATE_CONFIG_PATH: self.workdir / "accelerate.yaml",
        }

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def write_files(self) -> None:
        for path in self.claim_paths.values():
            Path(path).mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.files[TRAINER_CONFIG_PATH].write_text(
            self.config.model_dump_json(by_alias=True, indent=2) + "\n"
        )
        self.files[ACCELERATE_CONFIG_PATH].write_text(
            render_config_map(self.job, cpu=self.options.cpu)["data"][ACCELERATE_CONFIG_FILE]
        )

    def process(
        self, container: Manifest, name: str, rank: int, master_port: int
    ) -> tuple[list[str], dict[str, str]]:
        """The container's command and env as a kubelet would start it, on this machine."""
        return kubelet_process(
            container,
            rank,
            master_port,
            self.files,
            self.termination(name, rank),
            self.workdir / "pods" / f"{name}-{rank}" / "tmp",
            self.say,
        )

    def termination(self, name: str, rank: int) -> Path:
        return self.workdir / "logs" / f"{name}-{rank}.termination.json"

    def run_pods(self, job_manifest: Manifest, name: str) -> list[int]:
        """Start one process per pod of the Job; show rank 0's progress; return exit codes."""
        pod = job_manifest["spec"]["template"]["spec"]
        container = pod["containers"][0]
        count = int(job_manifest["spec"].get("completions", 1))
        port = free_port()
        processes = []
        for rank in range(count):
            command, env = self.process(container, name, rank, port)
            self.termination(name, rank).unlink(missing_ok=True)
            log = (self.workdir / "logs" / f"{name}-{rank}.log").open("w")
            process = subprocess.Popen(
                command,
                env=env,
                stdout=subprocess.PIPE if rank == 0 else log,
                stderr=subprocess.STDOUT,
                text=True,
            )
            processes.append((process, log))
        first, first_log = processes[0]
        assert first.stdout is not None
        for line in first.stdout:
            first_log.write(line)
            if _SHOWN.search(line):
                self.say(f"  {line.rstrip()}")
        codes = [process.wait() for process, _ in processes]
        for _, log in processes:
            log.close()
        return codes

    def message(self, name: str) -> dict[str, Any]:
        path = self.termination(name, 0)
        if not path.exists():
            return {}
        try:
            loaded: dict[str, Any] = json.loads(path.read_text())
        except json.JSONDecodeError:
            return {"message": path.read_text()[-2000:]}
        return loaded

    def train(self) -> Outcome:
        restarts, limit = 0, self.job.spec.run_policy.max_restarts
        while True:
            attempt = restarts + 1
            layout = self.config.distributed
            self.say(
                f"Training: {layout.strategy} on {layout.nnodes} pod(s) x "
                f"{layout.nproc_per_node} {layout.device} process(es), attempt {attempt}; live "
                f"metrics at http://127.0.0.1:{self.config.metrics_port}/metrics"
            )
            codes = self.run_pods(
                render_training_job(self.job, attempt, cpu=self.options.cpu), "train"
            )
            if all(code == 0 for code in codes):
                return Outcome("Trained", 0)
            for fatal, what in (
                (EXIT_BAD_INPUT, "bad input"),
                (EXIT_WRONG_ENVIRONMENT, "not what was rendered"),
            ):
                if fatal in codes:
                    reason = self.message("train").get("message", what)
                    return Outcome("Failed", fatal, [f"{what}: {reason}"])
            if restarts >= limit:
                return Outcome(
                    "Failed",
                    EXIT_FAILED,
                    [
                        f"training failed with exit codes {codes} after {restarts} restart(s); "
                        f"see {self.workdir / 'logs'}"
                    ],
                )
            restarts += 1
            self.say(
                f"Training failed (exit codes {codes}); restarting from the last checkpoint "
                f"({restarts}/{limit})"
            )

    def evaluate(self) -> tuple[Outcome, dict[str, Any]]:
        self.say("Evaluating: the held-out gate")
        (code,) = self.run_pods(render_eval_job(self.job, 1, cpu=self.options.cpu), "eval")
        report = self.message("eval")
        if code == 0:
            return Outcome("Passed", 0), report
        if code == EXIT_GATE_REJECTED:
            return Outcome(
                "Rejected", EXIT_GATE_REJECTED, [report.get("message", "rejected")]
            ), report
        return Outcome(
            "Failed",
            code if code == EXIT_BAD_INPUT else EXIT_FAILED,
            [f"the gate could not run: {report.get('message', f'exit code {code}')}"],
        ), report

    def promote(self) -> tuple[Outcome, dict[str, Any]]:
        self.say("Promoting")
        (code,) = self.run_pods(render_promote_job(self.job, 1), "promote")
        result = self.message("promote")
        if code == 0:
            return Outcome("Succeeded", 0), result
        return Outcome(
            "Failed",
            code if code == EXIT_BAD_INPUT else EXIT_FAILED,
            [f"promotion failed: {result.get('message', f'exit code {code}')}"],
        ), result


def run(
    job: DPOJob,
    options: LocalOptions,
    out: IO[str] = sys.stdout,
    confirm: Callable[[str], bool] | None = None,
) -> int:
    """Train, gate and promote `job` here; print progress and a summary; return an exit code."""
    gpus = local_gpus()
    if job.spec.resources.gpus_per_node > gpus and not options.cpu:
        print(
            f"spec.resources.gpusPerNode is {job.spec.resources.gpus_per_node} but this machine "
            f"has {gpus} GPU(s); run with --cpu to train on the CPU, or lower gpusPerNode",
            file=out,
        )
        return EXIT_BAD_INPUT
    local = LocalRun(job, options, out)
    local.write_files()
    local.say(f"DPOJob {job.namespace}/{job.name}: run directory {local.workdir}")
    outcome = local.train()
    gate: dict[str, Any] = {}
    promotion: dict[str, Any] = {}
    if outcome.exit_code == 0 and job.spec.eval_gate.enabled:
        outcome, gate = local.evaluate()
        if outcome.exit_code == 0 and job.spec.promotion is not None:
            manual = job.spec.promotion.mode == "manual"
            approved = options.approve or (
                manual
                and confirm is not None
                and confirm(
                    f"Promote adapter {gate.get('adapterDigest')} to {job.spec.promotion.target}?"
                )
            )
            if manual and not approved:
                outcome = Outcome(
                    "AwaitingApproval",
                    0,
                    [
                        "promotion is manual: run again with --approve to promote (training is "
                        "not repeated; the gate is re-checked)"
                    ],
                )
            else:
                outcome, promotion = local.promote()
        elif outcome.exit_code == 0:
            outcome = Outcome("Succeeded", 0)
    elif outcome.exit_code == 0:
        outcome = Outcome("Succeeded", 0)
    _summary(local, outcome, gate, promotion)
    return outcome.exit_code


def _summary(
    local: LocalRun, outcome: Outcome, gate: dict[str, Any], promotion: dict[str, Any]
) -> None:
    say = local.say
    say("")
    say(f"DPOJob {local.job.namespace}/{local.job.name}: {outcome.phase}")
    for line in outcome.lines:
        say(f"  {line}")
    train_report = Path(local.config.artifacts_dir) / "train.json"
    if train_report.exists():
        summary = json.loads(train_report.read_text())
        metrics = summary.get("metrics", {})
        say(
            f"training   step {summary.get('step')}  loss {metrics.get('dpo_train_loss', 0):.4f}  "
            f"reward accuracy {metrics.get('dpo_train_reward_accuracy', 0):.3f}  "
            f"margin {metrics.get('dpo_train_reward_margin', 0):.4f}"
        )
        ran = summary.get("distributed")
        if ran:
            say(f"ran        {describe_distributed_run(ran)}")
        plot = plot_rewards(summary.get("logHistory", []), local.workdir / "rewards.png")
        if plot:
            say(f"plot       {plot}")
    if gate:
        say(f"gate       {gate.get('verdict', 'not run')}")
        for criterion in gate.get("criteria", []):
            value = criterion["value"]
            shown = "n/a" if value is None else f"{value:.4f}"
            verdict = "pass" if criterion["passed"] else "FAIL"
            threshold = criterion["threshold"]
            say(f"  {criterion['name']:18s} {shown:>9s}  threshold {threshold:<8} {verdict}")
    if promotion:
        say(f"promoted   {promotion.get('version')} -> {promotion.get('uri')}")
    say(f"artifacts  {local.config.artifacts_dir}")


def describe_distributed_run(ran: Mapping[str, Any]) -> str:
    """One line from train.json's `distributed`: what the trainer really ran on."""
    kind = ran["distributedType"]
    if kind == "FSDP":
        shape = ran["meshShape"] or []
        mesh = "x".join(str(size) for size in shape)
        over = (
            f"a {mesh} mesh ({', '.join(ran['meshDims'] or [])})"
            if len(shape) > 1
            else f"{mesh} ranks"
        )
        kind = f"FSDP{ran['fsdpVersion']} sharded over {over}"
    return f"{kind}, world size {ran['worldSize']}, parameters on {ran['device']}"


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


def _expand(text: str, values: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, others left as written."""
    return re.sub(r"\$\((\w+)\)", lambda m: values.get(m.group(1), m.group(0)), text)
