"""Parallelism: which strategy runs, and the accelerate config (FSDP2, HSDP) it renders."""

from __future__ import annotations

from typing import Any

import pytest
from dpo_operator.api import describe_errors
from dpo_operator.core.render import trainer_config
from dpo_operator.core.render.accelerate import accelerate_config
from dpo_operator.core.resolve import resolve
from dpo_operator.core.validate import parse_dpojob
from pydantic import ValidationError

from tests.conftest import job_with, minimal_manifest, set_fields


@pytest.mark.parametrize(
    ("nodes", "gpus", "lora", "expected"),
    [
        (1, 1, True, "single"),
        (1, 0, False, "single"),
        (1, 8, True, "ddp"),
        (2, 0, True, "ddp"),
        (1, 8, False, "fsdp"),
        (4, 8, False, "hsdp"),
        (4, 1, False, "fsdp"),
        (2, 8, True, "ddp"),
    ],
)
def test_auto_picks_the_cheapest_strategy_that_fits(
    nodes: int, gpus: int, lora: bool, expected: str
) -> None:
    job = job_with(resources={"nodes": nodes, "gpusPerNode": gpus}, peft={"enabled": lora})
    assert resolve(job).layout.strategy == expected


def test_hsdp_shards_inside_a_node_and_replicates_across_nodes() -> None:
    job = job_with(resources={"nodes": 4, "gpusPerNode": 8}, parallelism={"strategy": "hsdp"})
    config = accelerate_config(resolve(job))
    assert config["distributed_type"] == "FSDP"
    assert config["num_machines"] == 4
    assert config["num_processes"] == 32
    assert config["fsdp_config"]["fsdp_version"] == 2
    assert config["fsdp_config"]["fsdp_reshard_after_forward"] is True
    assert config["parallelism_config"] == {
        "parallelism_config_dp_replicate_size": 4,
        "parallelism_config_dp_shard_size": 8,
        "parallelism_config_tp_size": 1,
        "parallelism_config_cp_size": 1,
    }


def test_fsdp1_is_refused_with_what_to_do() -> None:
    manifest = set_fields(minimal_manifest(), **{"parallelism.fsdpVersion": 1})
    with pytest.raises(ValidationError) as refused:
        parse_dpojob(manifest)
    assert describe_errors(refused.value) == [
        "spec.parallelism.fsdpVersion: removed: fsdp and hsdp always run FSDP2 (FSDP1 is "
        "deprecated in PyTorch and cannot run off a GPU, so it could not be tested); delete the "
        "field"
    ]


def test_fsdp_on_one_node_has_no_replication_group() -> None:
    job = job_with(resources={"gpusPerNode": 8}, parallelism={"strategy": "fsdp"})
    config = accelerate_config(resolve(job))
    assert config["distributed_type"] == "FSDP"
    assert "parallelism_config" not in config


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "hsdp"])
@pytest.mark.parametrize("wanted", [True, False])
def test_activations_are_checkpointed_by_the_trainer_never_by_fsdp(
    strategy: str, wanted: bool
) -> None:
    job = job_with(
        resources={"nodes": 2, "gpusPerNode": 8},
        parallelism={"strategy": strategy, "activationCheckpointing": wanted},
    )
    config: dict[str, Any] = accelerate_config(resolve(job))
    assert config.get("fsdp_config", {}).get("fsdp_activation_checkpointing", False) is False
    assert trainer_config(resolve(job)).training.gradient_checkpointing is wanted


def test_cpu_runs_use_gloo_without_mixed_precision() -> None:
    config = accelerate_config(resolve(job_with(resources={"nodes": 2, "gpusPerNode": 0})))
    assert config["distributed_type"] == "MULTI_CPU"
    assert config["use_cpu"] is True
    assert config["mixed_precision"] == "no"
    assert "gpu_ids" not in config


def test_gpu_runs_use_bf16() -> None:
    config = accelerate_config(resolve(job_with(resources={"gpusPerNode": 8})))
    assert config["mixed_precision"] == "bf16"
    assert config["distributed_type"] == "MULTI_GPU"
