"""How a DPOJob spreads over processes: the layout the memory plan chose, and its accelerate
config.

`cpu=True` keeps the job's process layout and strategy but runs it on CPUs over gloo: what
`dpo run --cpu` and the distributed test tier run, so that the accelerate/FSDP code users run on
GPUs is the code the tests execute (the trainer refuses a silent change of strategy).
"""

from __future__ import annotations

from typing import Any, Literal

from dpo_trainer.config import Strategy

from dpo_operator.api import DPOJobSpec
from dpo_operator.plan import Layout, plan

FSDP_VERSION: Literal[2] = 2


def processes_per_node(spec: DPOJobSpec) -> int:
    """One process per GPU; one per pod on CPU."""
    return max(spec.resources.gpus_per_node, 1)


def world_size(spec: DPOJobSpec) -> int:
    return spec.resources.nodes * processes_per_node(spec)


def layout(spec: DPOJobSpec) -> Layout:
    """The strategy and shard group the memory plan chose (`auto`: the cheapest that fits)."""
    chosen = plan(spec).choice
    assert chosen is not None, "DPOJobSpec validation rejects a job that fits nowhere"
    return chosen


def resolve_strategy(spec: DPOJobSpec) -> Strategy:
    return layout(spec).strategy


def fsdp_version(spec: DPOJobSpec) -> Literal[2] | None:
    """The FSDP implementation that shards the job (always FSDP2), or None when nothing is."""
    return FSDP_VERSION if resolve_strategy(spec) in ("fsdp", "hsdp") else None


def on_cpu(spec: DPOJobSpec, cpu: bool) -> bool:
    return cpu or spec.resources.gpus_per_node == 0


def mixed_precision(spec: DPOJobSpec, *, cpu: bool = False) -> Literal["bf16", "no"]:
    """bf16 on GPUs (the trainer falls back to fp32 where the GPU lacks it); fp32 on CPU."""
    return "no" if on_cpu(spec, cpu) else "bf16"


def accelerate_config(spec: DPOJobSpec, *, cpu: bool = False) -> dict[str, Any]:
    """The content of /etc/dpo/accelerate.yaml.

    Machine rank and the main process address are per pod and passed on the command line; only
    what all pods share is here. Several processes per pod are started by accelerate's torchrun
    launcher (MULTI_GPU, FSDP), which also spawns them on CPUs; one process per pod on CPU uses
    the plain launcher (MULTI_CPU) with the ranks from the pod's env.
    """
    chosen = layout(spec)
    one_process_per_pod = spec.resources.gpus_per_node == 0
    distributed_type = {
        "single": "NO",
        "ddp": "MULTI_CPU" if one_process_per_pod else "MULTI_GPU",
        "fsdp": "FSDP",
        "hsdp": "FSDP",
    }[chosen.strategy]
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": distributed_type,
        "num_machines": spec.resources.nodes,
        "num_processes": world_size(spec),
        "machine_rank": 0,
        "rdzv_backend": "static",
        "same_network": True,
        "mixed_precision": mixed_precision(spec, cpu=cpu),
        "use_cpu": on_cpu(spec, cpu),
        "downcast_bf16": "no",
        "main_training_function": "main",
    }
    if not on_cpu(spec, cpu):
        config["gpu_ids"] = "all"
    if chosen.strategy in ("fsdp", "hsdp"):
        config["fsdp_config"] = _fsdp_config(spec)
    if chosen.strategy == "hsdp":
        # Shard groups of `shard` GPUs (one node, or as many nodes as the model needs), each
        # group a replica.
        config["parallelism_config"] = {
            "parallelism_config_dp_replicate_size": world_size(spec) // chosen.shard,
            "parallelism_config_dp_shard_size": chosen.shard,
            "parallelism_config_tp_size": 1,
            "parallelism_config_cp_size": 1,
        }
    return config


def _fsdp_config(spec: DPOJobSpec) -> dict[str, Any]:
    parallelism = spec.parallelism
    return {
        "fsdp_version": FSDP_VERSION,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        # Checkpoints stay sharded (each rank writes its own part, fast, what resume reads); the
        # trainer gathers full tensors once for the final artifact.
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_offload_params": parallelism.cpu_offload,
        # Activations are checkpointed by the Trainer (transformers' gradient checkpointing, as in
        # TRL's own FSDP2 config), never by FSDP: its checkpoint wrapper renames every layer, so
        # PEFT finds none of the adapter's weights when saving it, and both at once break the
        # backward pass.
        "fsdp_activation_checkpointing": False,
        "fsdp_reshard_after_forward": True,
    }
