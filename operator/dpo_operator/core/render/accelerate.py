"""/etc/dpo/accelerate.yaml: how the job spreads over processes, in the layout the memory plan
chose.

`Settings.cpu` keeps the job's process layout and strategy but runs it on CPUs over gloo: what
`dpo run --cpu` and the distributed test tier run, so that the accelerate/FSDP code users run on
GPUs is the code the tests execute (the trainer refuses a silent change of strategy).
"""

from __future__ import annotations

from typing import Any

from dpo_operator.api import DPOJobSpec
from dpo_operator.core.resolve import FSDP_VERSION, ResolvedJob


def accelerate_config(resolved: ResolvedJob) -> dict[str, Any]:
    """The content of /etc/dpo/accelerate.yaml.

    Machine rank and the main process address are per pod and passed on the command line; only
    what all pods share is here. Several processes per pod are started by accelerate's torchrun
    launcher (MULTI_GPU, FSDP), which also spawns them on CPUs; one process per pod on CPU uses
    the plain launcher (MULTI_CPU) with the ranks from the pod's env.
    """
    spec = resolved.spec
    chosen = resolved.layout
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
        "num_processes": resolved.world_size,
        "machine_rank": 0,
        "rdzv_backend": "static",
        "same_network": True,
        "mixed_precision": resolved.mixed_precision,
        "use_cpu": resolved.on_cpu,
        "downcast_bf16": "no",
        "main_training_function": "main",
    }
    if not resolved.on_cpu:
        config["gpu_ids"] = "all"
    if chosen.strategy in ("fsdp", "hsdp"):
        config["fsdp_config"] = _fsdp_config(spec)
    if chosen.strategy == "hsdp":
        # Shard groups of `shard` GPUs (one node, or as many nodes as the model needs), each
        # group a replica.
        config["parallelism_config"] = {
            "parallelism_config_dp_replicate_size": resolved.world_size // chosen.shard,
            "parallelism_config_dp_shard_size": chosen.shard,
            "parallelism_config_tp_size": 1,
            "parallelism_config_cp_size": 1,
        }
    return config


def _fsdp_config(spec: DPOJobSpec) -> dict[str, Any]:
    parallelism = spec.parallelism
    return {
        "fsdp_version": FSDP_VERSION,
        # The trainer shards the models itself, per decoder layer, before any rank holds them
        # whole (it builds them on the meta device and reads each rank's slice of the
        # checkpoint): accelerate receives them sharded and neither wraps nor loads them again.
        "fsdp_auto_wrap_policy": "NO_WRAP",
        # Checkpoints stay sharded (each rank writes its own part, fast, what resume reads); the
        # final artifact is written by every rank, each its part.
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_cpu_ram_efficient_loading": False,
        "fsdp_offload_params": parallelism.cpu_offload,
        # Activations are checkpointed by the Trainer (transformers' gradient checkpointing, as in
        # TRL's own FSDP2 config), never by FSDP: its checkpoint wrapper renames every layer, so
        # PEFT finds none of the adapter's weights when saving it, and both at once break the
        # backward pass.
        "fsdp_activation_checkpointing": False,
        "fsdp_reshard_after_forward": True,
    }
