"""GPUs asked for are GPUs used, and what runs is what was rendered: never a silent fallback."""

from __future__ import annotations

from pathlib import Path

import pytest
from dpo_contract.config import DistributedConfig, DistributedRun
from dpo_contract.pod import EXIT_WRONG_ENVIRONMENT, WrongEnvironmentError
from dpo_trainer.distributed import check_run

from tests.trainer.conftest import local_config, tiny_job, trainer_cli

HSDP = DistributedConfig(nnodes=2, nproc_per_node=8, strategy="hsdp", fsdp_version=2)


def ran(**changes: object) -> DistributedRun:
    what_hsdp_runs = DistributedRun(
        distributed_type="FSDP",
        fsdp_version=2,
        mesh_shape=[2, 8],
        mesh_dims=["dp_replicate", "dp_shard_cp"],
        world_size=16,
        device="cuda",
    )
    return what_hsdp_runs.model_copy(update=changes)


def test_a_gpu_job_on_a_pod_without_cuda_stops_before_training(tmp_path: Path) -> None:
    config = local_config(tiny_job(resources={"nodes": 1, "gpusPerNode": 1}), tmp_path)
    assert config.distributed.device == "cuda"
    code, termination = trainer_cli("train", config, tmp_path)
    message = termination["message"]
    print(message)
    assert code == EXIT_WRONG_ENVIRONMENT
    assert termination["status"] == "wrong-environment"
    assert "trainer.json (distributed.device: cuda) asks for 1 GPU(s) per pod but" in message
    assert "resources.gpusPerNode" in message
    assert not (tmp_path / "artifacts" / "adapter").exists()


def test_what_hsdp_should_run_passes() -> None:
    check_run(HSDP, ran())


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"distributed_type": "MULTI_GPU"}, "distributed type MULTI_GPU (expected FSDP)"),
        ({"mesh_shape": [16]}, "sharded over a mesh of shape [16] (expected [2, 8])"),
        ({"world_size": 8}, "world size 8 (expected 16)"),
        ({"device": "cpu"}, "parameters on cpu (expected cuda)"),
        ({"fsdp_version": None}, "FSDP version None (expected 2)"),
    ],
)
def test_each_difference_from_the_rendered_layout_is_refused_by_name(
    changes: dict[str, object], named: str
) -> None:
    with pytest.raises(WrongEnvironmentError) as refused:
        check_run(HSDP, ran(**changes))
    assert named in str(refused.value)
    assert "renders hsdp on 2 node(s) x 8 cuda process(es)" in str(refused.value)


def test_a_gate_that_asks_for_gpus_on_a_pod_without_cuda_stops_at_once(tmp_path: Path) -> None:
    config = local_config(tiny_job(), tmp_path)
    assert config.gate is not None
    gpu_gate = config.model_copy(update={"gate": config.gate.model_copy(update={"gpus": 2})})
    code, termination = trainer_cli("eval", gpu_gate, tmp_path)
    print(termination["message"])
    assert code == EXIT_WRONG_ENVIRONMENT
    assert "trainer.json (gate.gpus) asks for 2 GPU(s) per pod but" in termination["message"]
