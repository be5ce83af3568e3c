"""trainer.json: every setting of the pod contract resolved from the DPOJob."""

from __future__ import annotations

from dpo_contract.config import (
    DataConfig,
    DistributedConfig,
    FabricConfig,
    GateConfig,
    HealthConfig,
    HoldOut,
    JobIdentity,
    PromotionConfig,
    TrainerConfig,
    TrainingConfig,
)
from dpo_contract.fields import LoraSettings, PolicyRef

from dpo_operator.core.names import run_id
from dpo_operator.core.network import PROFILES
from dpo_operator.core.render.evaluation import eval_gpus
from dpo_operator.core.resolve import ResolvedJob
from dpo_operator.core.serving import served_model_name
from dpo_operator.core.storage import (
    ClaimPaths,
    artifacts_dir,
    in_pod,
    model_in_pod,
    optional_in_pod,
    pod_path,
    reference_cache_dir,
    staged_model,
)


def trainer_config(resolved: ResolvedJob, claim_paths: ClaimPaths | None = None) -> TrainerConfig:
    """trainer.json: every setting resolved. `claim_paths` maps PVCs to local directories
    (`dpo run`); by default they are where the pods mount them."""
    job, spec = resolved.job, resolved.spec
    gate = spec.eval_gate
    # A gate but no held-out pairs given: a part of the training pairs is held out for it.
    hold_out = (
        HoldOut(fraction=spec.data.hold_out.fraction, max_pairs=spec.data.hold_out.max_pairs)
        if gate.enabled and spec.data.eval is None and gate.data is None
        else None
    )
    gate_data = in_pod(gate.data or spec.data.eval or spec.data.train, claim_paths)
    chosen = resolved.layout
    return TrainerConfig(
        job=JobIdentity(name=job.name, namespace=job.namespace, uid=run_id(job)),
        model=PolicyRef(
            name=pod_path(spec.model.name, claim_paths),
            revision=spec.model.revision,
            staged=staged_model(job, claim_paths),
        ),
        reference=model_in_pod(spec.model.reference, claim_paths) if spec.model.reference else None,
        trust_remote_code=spec.model.trust_remote_code,
        data=DataConfig(
            train=in_pod(spec.data.train, claim_paths),
            eval=optional_in_pod(spec.data.eval, claim_paths),
            format=spec.data.format,
            columns=spec.data.columns,
            hold_out=hold_out,
        ),
        training=TrainingConfig(
            loss_type=spec.dpo.loss_type,
            loss_weights=spec.dpo.loss_weights,
            beta=spec.dpo.beta,
            simpo_gamma=spec.dpo.simpo_gamma,
            learning_rate=spec.learning_rate,
            num_train_epochs=spec.dpo.epochs,
            max_steps=spec.dpo.max_steps,
            per_device_train_batch_size=spec.dpo.per_device_batch_size,
            gradient_accumulation_steps=resolved.gradient_accumulation_steps,
            max_length=spec.dpo.max_length,
            precompute_ref_log_probs=spec.dpo.precompute_ref_log_probs,
            seed=spec.dpo.seed,
            logging_steps=spec.dpo.logging_steps,
            save_steps=spec.dpo.save_steps,
            gradient_checkpointing=spec.parallelism.activation_checkpointing,
            mixed_precision=resolved.mixed_precision,
            step_timeout_seconds=spec.network.collective_timeout_seconds,
            transfer_timeout_seconds=resolved.transfer_timeout_seconds,
            save_on_signal=resolved.saves_on_signal,
            extra=spec.dpo.extra,
        ),
        lora=LoraSettings.model_validate(spec.peft.model_dump(exclude={"enabled"}))
        if spec.peft.enabled
        else None,
        distributed=DistributedConfig(
            nnodes=spec.resources.nodes,
            nproc_per_node=resolved.processes_per_node,
            strategy=chosen.strategy,
            fsdp_version=resolved.fsdp_version,
            shard_group_size=chosen.shard if chosen.strategy == "hsdp" else None,
            device="cpu" if resolved.on_cpu else "cuda",
        ),
        artifacts_dir=artifacts_dir(job, claim_paths),
        gate=GateConfig(
            gpus=eval_gpus(resolved),
            data=gate_data,
            hold_out=hold_out,
            anchor_data=optional_in_pod(gate.anchor_data, claim_paths),
            max_samples=gate.max_samples,
            min_reward_accuracy=gate.min_reward_accuracy,
            min_reward_margin=gate.min_reward_margin,
            max_anchor_nll_increase=gate.max_anchor_nll_increase,
            must_beat_promoted=gate.must_beat_promoted,
            beat_margin=gate.beat_margin,
            confidence=gate.confidence,
        )
        if gate.enabled
        else None,
        promotion=PromotionConfig(
            target=pod_path(spec.promotion.target, claim_paths),
            mode=spec.promotion.mode,
            served_model_name=served_model_name(job),
            plain_http=spec.promotion.plain_http,
        )
        if spec.promotion
        else None,
        reference_cache=reference_cache_dir(job, claim_paths)
        if spec.dpo.precompute_ref_log_probs
        else None,
        health=HealthConfig(
            action=spec.health.action,
            warmup_steps=spec.health.warmup_steps,
            straggler_factor=spec.health.straggler_factor,
        ),
        fabric=fabric_config(resolved),
        metrics_port=spec.monitoring.port,
    )


# The preflight's largest message when the spec does not say: big enough to reach an NVLink or
# InfiniBand fabric's plateau on GPUs; a few MiB over sockets between CPU pods.
PREFLIGHT_MAX_MIB = {"cuda": 256, "cpu": 4}


def fabric_config(resolved: ResolvedJob) -> FabricConfig:
    network = resolved.network
    profile = PROFILES[network.profile]
    preflight = network.preflight
    device = "cpu" if resolved.on_cpu else "cuda"
    return FabricConfig(
        profile=network.profile,
        transport=profile.transport,
        gpu_direct_rdma=profile.gpu_direct_rdma,
        on_mismatch=network.on_mismatch,
        preflight=preflight.enabled,
        preflight_max_bytes=(preflight.max_message_mib or PREFLIGHT_MAX_MIB[device]) << 20,
        min_bus_bandwidth_gbps=preflight.min_bus_bandwidth_gbps,
    )
