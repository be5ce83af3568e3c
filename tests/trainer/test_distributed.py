"""Two pods' worth of processes, launched exactly as `dpo render` says, train as one job."""

from __future__ import annotations

import json
from pathlib import Path

from dpo_contract.pod import EXIT_BAD_INPUT

from tests.trainer.conftest import (
    free_port,
    local_config,
    pod_process,
    start,
    tiny_job,
    trainer_cli,
)


def test_two_nodes_over_gloo_train_together_and_agree(tmp_path: Path) -> None:
    job = tiny_job(resources={"nodes": 2, "gpusPerNode": 0}, dpo={"maxSteps": 20})
    config = local_config(job, tmp_path)
    port = free_port()
    processes = []
    for rank in (0, 1):
        command, env = pod_process(job, rank, tmp_path, config, master_port=port)
        assert "--machine_rank" in command
        assert "--main_process_ip" in command
        processes.append(start(command, env, tmp_path / f"rank-{rank}.log"))
    for rank, process in enumerate(processes):
        assert process.wait(timeout=400) == 0, (tmp_path / f"rank-{rank}.log").read_text()[-3000:]

    ranks = [json.loads((tmp_path / f"termination-{r}.json").read_text()) for r in (0, 1)]
    print("rank summaries:", ranks)
    assert [r["worldSize"] for r in ranks] == [2, 2], "both ranks joined one process group"
    assert ranks[0]["parametersDigest"] == ranks[1]["parametersDigest"], "weights stayed in sync"
    assert ranks[0]["metrics"]["dpo_train_reward_accuracy"] > 0.5
    assert ranks[1]["metrics"] == {}, "only rank 0 reports metrics"
    summary = json.loads((tmp_path / "artifacts" / "train.json").read_text())
    assert summary["worldSize"] == 2
    assert summary["step"] == 20


def test_a_launch_that_lost_its_rendezvous_fails_instead_of_training_alone(
    tmp_path: Path,
) -> None:
    job = tiny_job(resources={"nodes": 2, "gpusPerNode": 0})
    code, termination = trainer_cli("train", local_config(job, tmp_path), tmp_path)
    assert code == EXIT_BAD_INPUT
    message = termination["message"]
    assert "world size is 1 but the config expects 2 nodes x 1 processes = 2" in message
    assert not (tmp_path / "artifacts" / "adapter").exists()
