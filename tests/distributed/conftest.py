"""FSDP and HSDP really executed on CPU over gloo: the rendered pods, started as `dpo run --cpu`
starts them (one process per pod; accelerate's launcher spawns one trainer per "GPU" in it).

Runs are shared between tests through session fixtures: each configuration trains once.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import psutil
import pytest
import yaml
from dpo_contract.config import TrainerConfig
from dpo_operator.api import DPOJob
from dpo_operator.local.kubelet import free_port
from dpo_trainer.io.checkpoints import COMPLETE_MARKER

from tests.trainer.conftest import local_config, pod_process, tiny_job

# Every run sees the same 8 pairs per optimizer step: 2 processes x 4, 4 processes x 2, or one
# process x 8, so the losses of the sharded runs can be compared with a single process.
GLOBAL_BATCH = 8
STEPS = 8
SAVE_STEPS = 4


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.distributed)


@dataclass(frozen=True)
class PodLayout:
    """A process layout: what resources.nodes x gpusPerNode and the strategy render."""

    strategy: str
    nodes: int
    gpus_per_node: int

    @property
    def world_size(self) -> int:
        return self.nodes * max(self.gpus_per_node, 1)


SINGLE = PodLayout("single", 1, 0)
DDP_TWO_PODS = PodLayout("ddp", 2, 0)
FSDP = PodLayout("fsdp", 1, 2)
HSDP = PodLayout("hsdp", 2, 2)


def distributed_job(
    layout: PodLayout, *, lora: bool, precompute: bool = False, resizable: bool = False
) -> DPOJob:
    """Every layout sees the same GLOBAL_BATCH pairs per step. `resizable`: fixed by
    dpo.globalBatchSize, 2 pairs per process (accumulated twice at world size 2, once at 4), so
    the run may resume at another size; otherwise split evenly over the processes."""
    batch = (
        {"perDeviceBatchSize": 2, "globalBatchSize": GLOBAL_BATCH}
        if resizable
        else {"perDeviceBatchSize": GLOBAL_BATCH // layout.world_size}
    )
    return tiny_job(
        resources={"nodes": layout.nodes, "gpusPerNode": layout.gpus_per_node},
        parallelism={"strategy": "auto" if layout.strategy == "single" else layout.strategy},
        # No dropout: every layout must see exactly the same computation.
        peft={"enabled": lora, "dropout": 0.0},
        dpo={
            "maxSteps": STEPS,
            "saveSteps": SAVE_STEPS,
            "loggingSteps": 1,
            "precomputeRefLogProbs": precompute,
            **batch,
        },
    )


@dataclass
class Run:
    """A finished (or stopped) launch of every pod of a training Job."""

    workdir: Path
    config: TrainerConfig
    codes: list[int]

    @property
    def artifacts(self) -> Path:
        """Where the artifacts are: the mounted path, or the stand-in bucket's folder."""
        return Path(self.config.artifacts_dir.removeprefix("file://"))

    def log(self, pod: int = 0) -> str:
        return (self.workdir / f"pod-{pod}.log").read_text()

    def termination(self, pod: int = 0) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((self.workdir / f"termination-{pod}.json").read_text())
        return loaded

    def summary(self) -> dict[str, Any]:
        """train.json, wherever the artifacts are (a path, `file://` or a real store)."""
        with fsspec.open(f"{self.config.artifacts_dir.rstrip('/')}/train.json", "rb") as stream:
            loaded: dict[str, Any] = json.load(stream)
        return loaded

    def losses(self) -> dict[int, float]:
        return {e["step"]: e["loss"] for e in self.summary()["logHistory"] if "loss" in e}

    def assert_succeeded(self) -> None:
        for pod, code in enumerate(self.codes):
            assert code == 0, f"pod {pod} exited {code}:\n{self.log(pod)[-4000:]}"


def prepare(
    job: DPOJob,
    workdir: Path,
    *,
    bucket: bool = False,
    store: str | None = None,
    training: dict[str, Any] | None = None,
    fabric: dict[str, Any] | None = None,
    tamper_accelerate: dict[str, Any] | None = None,
) -> tuple[TrainerConfig, list[tuple[list[str], dict[str, str]]]]:
    """trainer.json and each pod's command and env; `bucket` puts the artifacts in a `file://`
    store that the pods reach only by upload and download, each working in its own /tmp
    (`store`: in that object store instead); `training` changes trainer.json's training
    settings, `fabric` what it expects of the fabric; `tamper_accelerate` changes the rendered
    accelerate.yaml (a launcher that differs)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cpu = job.spec.resources.gpus_per_node > 0
    config = local_config(job, workdir, cpu=cpu)
    if bucket or store:
        config = config.model_copy(
            update={"artifacts_dir": store or f"file://{workdir / 'bucket'}"}
        )
    if training:
        config = config.model_copy(update={"training": config.training.model_copy(update=training)})
    if fabric:
        config = config.model_copy(update={"fabric": config.fabric.model_copy(update=fabric)})
    port = free_port()
    pods = [
        pod_process(job, rank, workdir, config, master_port=port, cpu=cpu)
        for rank in range(job.spec.resources.nodes)
    ]
    if tamper_accelerate:
        accelerate = workdir / "accelerate.yaml"
        accelerate.write_text(
            yaml.safe_dump({**yaml.safe_load(accelerate.read_text()), **tamper_accelerate})
        )
    return config, pods


def launch(
    job: DPOJob,
    workdir: Path,
    *,
    bucket: bool = False,
    store: str | None = None,
    training: dict[str, Any] | None = None,
    fabric: dict[str, Any] | None = None,
    pod_env: dict[int, dict[str, str]] | None = None,
    tamper_accelerate: dict[str, Any] | None = None,
    crash_after_checkpoint: int | None = None,
    timeout: float = 600,
) -> Run:
    """Start every pod's process and wait for all (`pod_env`: more variables for some pods, as
    their Secrets give them). With `crash_after_checkpoint`, SIGKILL every pod's whole process
    tree once that checkpoint is complete in the artifacts (a crash: nothing more is saved)."""
    config, pods = prepare(
        job,
        workdir,
        bucket=bucket,
        store=store,
        training=training,
        fabric=fabric,
        tamper_accelerate=tamper_accelerate,
    )
    processes = start_pods(pods, workdir, pod_env)
    run = Run(workdir, config, [])
    if crash_after_checkpoint is not None:
        fs, root = fsspec.core.url_to_fs(config.artifacts_dir)
        marker = f"{root}/checkpoints/checkpoint-{crash_after_checkpoint}/{COMPLETE_MARKER}"

        def complete() -> bool:
            fs.invalidate_cache()
            return bool(fs.exists(marker))

        wait_while_running(processes, workdir, complete, marker, timeout)
        signal_pods(processes, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    run.codes = [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in processes]
    return run


def start_pods(
    pods: list[tuple[list[str], dict[str, str]]],
    workdir: Path,
    pod_env: dict[int, dict[str, str]] | None = None,
) -> list[subprocess.Popen[bytes]]:
    """Each pod's process as `prepare` gave it (`pod_env`: more variables for some pods), its
    output in workdir/pod-<rank>.log."""
    return [
        subprocess.Popen(
            command,
            env=env | (pod_env or {}).get(rank, {}),
            stdout=(workdir / f"pod-{rank}.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for rank, (command, env) in enumerate(pods)
    ]


def wait_while_running(
    pods: list[subprocess.Popen[bytes]],
    workdir: Path,
    done: Callable[[], bool],
    what: str,
    timeout: float = 300,
) -> None:
    """Until `done()`, failing if a pod ends first (its log's end shown) or `what` does not
    come within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        for rank, pod in enumerate(pods):
            log = (workdir / f"pod-{rank}.log").read_text(errors="replace")
            assert pod.poll() is None, f"pod {rank} ended early:\n{log[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in time"
        time.sleep(0.05)


def logged(workdir: Path, text: str, pod: int = 0) -> Callable[[], bool]:
    """Whether pod `pod` has logged `text` yet."""
    return lambda: text in (workdir / f"pod-{pod}.log").read_text(errors="replace")


def crash(job: DPOJob, workdir: Path, after_checkpoint: int, **options: Any) -> Run:
    """Every pod killed (SIGKILL) once checkpoint `after_checkpoint` is complete, and their
    disks gone: the next launch gets new pods, as a restarted Job does."""
    crashed = launch(job, workdir, crash_after_checkpoint=after_checkpoint, **options)
    assert all(code < 0 for code in crashed.codes), f"killed: {crashed.codes}"
    new_pods(workdir, job.spec.resources.nodes)
    return crashed


def new_pods(workdir: Path, nodes: int) -> None:
    """The pods' own disks (their /tmp) gone, as they are for the pods of a new Job."""
    for pod in range(nodes):
        shutil.rmtree(workdir / f"pod-{pod}")


def signal_pods(pods: list[subprocess.Popen[bytes]], signum: int) -> None:
    """`signum` to the whole tree of each pod, as a node loss (or a hung node) takes it: the
    launcher, accelerate's launcher (its own session) and every trainer."""
    for pod in pods:
        with contextlib.suppress(psutil.NoSuchProcess):  # a pod that already ended
            launcher = psutil.Process(pod.pid)
            for process in [launcher, *launcher.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.send_signal(signum)


LAYOUTS = {"single": SINGLE, "fsdp": FSDP, "hsdp": HSDP}


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Run]:
    """Each layout x (full fine-tune, LoRA) trained once. hsdp keeps its artifacts in a
    `file://` store reached only by upload and download, each pod in its own /tmp."""
    finished = {}
    for name, layout in LAYOUTS.items():
        for kind in ("full", "lora"):
            workdir = tmp_path_factory.mktemp(f"{name}-{kind}")
            run = launch(
                distributed_job(layout, lora=kind == "lora"), workdir, bucket=layout is HSDP
            )
            run.assert_succeeded()
            finished[(name, kind)] = run
    return finished
