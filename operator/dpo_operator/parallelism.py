"""How a DPOJob spreads over processes: the resolved strategy and its accelerate config."""

from __future__ import annotations

from typing import Any, Literal

from dpo_operator.api import DPOJobSpec

ResolvedStrategy = Literal["single", "ddp", "fsdp", "hsdp"]


def processes_per_node(spec: DPOJobSpec) -> int:
    """One process per GPU; one per pod on CPU."""
    return max(spec.resources.gpus_per_node, 1)


def world_size(spec: DPOJobSpec) -> int:
    return spec.resources.nodes * processes_per_node(spec)


def resolve_strategy(spec: DPOJobSpec) -> ResolvedStrategy:
    """The strategy to run: `auto` picks the cheapest one that fits.

    One process needs no distribution. LoRA keeps the base weights frozen and its optimizer state
    tiny, so replicating (ddp) is cheapest; CPU runs use ddp over gloo. A full fine-tune holds
    ~16 bytes per parameter of weights, gradients and Adam state, so it is sharded: fsdp on one
    node, hsdp (shard in a node, replicate across nodes) on several.
    """
    strategy = spec.parallelism.strategy
    if strategy != "auto":
        return strategy
    if world_size(spec) == 1:
        return "single"
    if spec.peft.enabled or spec.resources.gpus_per_node == 0:
        return "ddp"
    return "hsdp" if spec.resources.nodes > 1 and spec.resources.gpus_per_node > 1 else "fsdp"


def mixed_precision(spec: DPOJobSpec) -> Literal["bf16", "no"]:
    """bf16 on GPUs (the trainer falls back to fp32 where the GPU lacks it); fp32 on CPU."""
    return "bf16" if spec.resources.gpus_per_node > 0 else "no"


def trainer_gradient_checkpointing(spec: DPOJobSpec) -> bool:
    """Whether the Trainer itself checkpoints activations.

    Under fsdp/hsdp, FSDP's own activation checkpointing is used instead: enabling both wraps
    layers twice and breaks the backward pass.
    """
    return spec.parallelism.activation_checkpointing and resolve_strategy(spec) in ("single", "ddp")


def accelerate_config(spec: DPOJobSpec) -> dict[str, Any]:
    """The content of /etc/dpo/accelerate.yaml.

    Machine rank and the main process address are per pod and passed on the command line; only
    what all pods share is here.
    """
    strategy = resolve_strategy(spec)
    on_cpu = spec.resources.gpus_per_node == 0
    distributed_type = {
        "single": "NO",
        "ddp": "MULTI_CPU" if on_cpu else "MULTI_GPU",
        "fsdp": "FSDP",
        "hsdp": "FSDP",
    }[strategy]
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": distributed_type,
        "num_machines": spec.resources.nodes,
        "num_processes": world_size(spec),
        "machine_rank": 0,
        "rdzv_backend": "static",
        "same_network": True,
        "mixed_precision": mixed_precision(spec),
        "use_cpu": on_cpu,
        "downcast_bf16": "no",
        "main_training_function": "main",
    }
    if not on_cpu:
        config["gpu_ids"] = "all"
    if strategy in ("fsdp", "hsdp"):
        config["fsdp_config"] = _fsdp_config(spec, strategy)
        if strategy == "hsdp" and spec.parallelism.fsdp_version == 2:
            config["parallelism_config"] = {
                "parallelism_config_dp_replicate_size": spec.resources.nodes,
                "parallelism_config_dp_shard_size": spec.resources.gpus_per_node,
                "parallelism_config_tp_size": 1,
                "parallelism_config_cp_size": 1,
            }
    return config


def _fsdp_config(spec: DPOJobSpec, strategy: ResolvedStrategy) -> dict[str, Any]:
    parallelism = spec.parallelism
    config: dict[str, Any] = {
        "fsdp_version": parallelism.fsdp_version,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_offload_params": parallelism.cpu_offload,
        "fsdp_activation_checkpointing": parallelism.activation_checkpointing,
    }
    if parallelism.fsdp_version == 2:
        config["fsdp_reshard_after_forward"] = True
    else:
        # FSDP1 spells HSDP as a sharding strategy; it needs the original parameters for LoRA
        # and broadcasts rank 0's weights when loading on one rank's CPU.
        config["fsdp_sharding_strategy"] = "HYBRID_SHARD" if strategy == "hsdp" else "FULL_SHARD"
        config["fsdp_use_orig_params"] = True
        config["fsdp_sync_module_states"] = True
    return config
