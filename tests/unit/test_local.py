"""`dpo run` on this machine: how rendered pods become local processes."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest
import yaml
from dpo_contract.pod import ACCELERATE_CONFIG_FILE, EXIT_BAD_INPUT
from dpo_operator.core.lifecycle import Create
from dpo_operator.core.render import render_config_map, render_training_job, trainer_config
from dpo_operator.core.resolve import resolve
from dpo_operator.core.settings import Settings
from dpo_operator.local import executor as local_executor
from dpo_operator.local.executor import LocalExecutor, LocalOptions, run

from tests.conftest import example


def test_a_gpu_job_on_a_machine_without_gpus_says_to_use_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_executor, "local_gpus", lambda: 0)
    out = io.StringIO()
    code = run(example("llama-8b-lora-infiniband"), LocalOptions(workdir=tmp_path), out=out)
    assert code == EXIT_BAD_INPUT
    assert "spec.resources.gpusPerNode is 8 but this machine has 0 GPU(s); run with --cpu" in (
        out.getvalue()
    )


ON_CPU = Settings(cpu=True)


def test_cpu_flag_keeps_the_strategy_and_layout_without_gpus_or_rdma() -> None:
    job = example("tcpxo")  # 70B LoRA, hsdp over 2 nodes x 8 H100, GPUDirect-TCPXO
    config = trainer_config(resolve(job, ON_CPU)).distributed
    assert (config.strategy, config.nnodes, config.nproc_per_node) == ("hsdp", 2, 8)
    assert config.device == "cpu"
    accelerate = yaml.safe_load(
        render_config_map(resolve(job, ON_CPU))["data"][ACCELERATE_CONFIG_FILE]
    )
    assert accelerate["distributed_type"] == "FSDP"
    assert accelerate["use_cpu"] is True
    assert accelerate["mixed_precision"] == "no"
    assert accelerate["parallelism_config"]["parallelism_config_dp_replicate_size"] == 2
    pod = render_training_job(resolve(job, ON_CPU), 1)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "limits" not in container["resources"], "no GPU devices"
    assert "initContainers" not in pod, "no TCPXO daemon"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NCCL_IB_DISABLE"] == "1", "plain TCP on CPUs"
    assert trainer_config(resolve(job)).distributed.device == "cuda"


def test_pods_become_processes_as_a_kubelet_would_start_them(tmp_path: Path) -> None:
    job = example("quickstart").model_copy(deep=True)
    job.spec.resources.nodes = 2
    job.spec.output.uri = "pvc://dpo-checkpoints"
    started: dict[int, tuple[list[str], dict[str, str]]] = {}

    def record(
        command: list[str], env: dict[str, str], component: str, attempt: int, rank: int
    ) -> subprocess.Popen[str]:
        started[rank] = (command, env)
        return subprocess.Popen(["true"], stdout=subprocess.PIPE, text=True)

    options = LocalOptions(workdir=tmp_path, volumes={"dpo-checkpoints": tmp_path / "ckpt"})
    executor = LocalExecutor(job, options, io.StringIO(), record)
    Create("config").carry_out(executor, job)
    Create("train", 1).carry_out(executor, job)
    executor.close()
    command, env = started[1]
    assert env["NODE_RANK"] == "1"
    assert env["RANK"] == "1", "$(NODE_RANK) expanded"
    pod_tmp = tmp_path / "pods" / "quickstart-train-1-1" / "tmp"
    assert env["TMPDIR"] == str(pod_tmp), "each pod has its own /tmp"
    assert env["MASTER_ADDR"] == "127.0.0.1"
    assert env["MASTER_PORT"] == started[0][1]["MASTER_PORT"]
    assert "$(" not in " ".join(command)
    assert str(tmp_path / "trainer.json") in command
    assert str(tmp_path / "accelerate.yaml") in command
    assert executor.config.artifacts_dir.startswith(str((tmp_path / "ckpt").resolve()))
