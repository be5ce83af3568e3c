"""`dpo run` on this machine: how rendered pods become local processes."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from dpo_operator import local
from dpo_operator.local import LocalOptions, LocalRun, for_this_machine, run
from dpo_operator.render import render_training_job
from dpo_trainer.config import EXIT_BAD_INPUT

from tests.conftest import example


def test_a_gpu_job_on_a_machine_without_gpus_says_to_use_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "local_gpus", lambda: 0)
    out = io.StringIO()
    code = run(example("llama-8b-lora-infiniband"), LocalOptions(workdir=tmp_path), out=out)
    assert code == EXIT_BAD_INPUT
    assert "spec.resources.gpusPerNode is 8 but this machine has 0 GPU(s); run with --cpu" in (
        out.getvalue()
    )


def test_cpu_flag_runs_the_same_job_without_gpus_or_rdma() -> None:
    job = for_this_machine(example("full-finetune-hsdp-efa"), cpu=True)
    assert job.spec.resources.gpus_per_node == 0
    assert job.spec.parallelism.strategy == "ddp"
    assert job.spec.network.profile == "tcp"
    assert job.spec.resources.nodes == 4
    assert for_this_machine(example("quickstart"), cpu=False) == example("quickstart")


def test_pods_become_processes_as_a_kubelet_would_start_them(tmp_path: Path) -> None:
    job = for_this_machine(example("llama-8b-lora-infiniband"), cpu=True)
    runner = LocalRun(
        job,
        LocalOptions(workdir=tmp_path, volumes={"dpo-checkpoints": tmp_path / "ckpt"}),
        io.StringIO(),
    )
    container = render_training_job(job, 1)["spec"]["template"]["spec"]["containers"][0]
    command, env = runner.process(container, "train", rank=1, master_port=4321)
    assert env["NODE_RANK"] == "1"
    assert env["RANK"] == "1", "$(NODE_RANK) expanded"
    assert env["MASTER_ADDR"] == "127.0.0.1"
    assert env["MASTER_PORT"] == "4321"
    assert "$(" not in " ".join(command)
    assert str(tmp_path / "trainer.json") in command
    assert str(tmp_path / "accelerate.yaml") in command
    assert runner.config.artifacts_dir.startswith(str((tmp_path / "ckpt").resolve()))
