"""What the libraries the trainer drives accept: the DPOConfig fields `spec.dpo.extra` may set,
the fields TRL removed, and the LoRA adapters vLLM serves.
"""

from __future__ import annotations

# The DPOConfig fields `spec.dpo.extra` may set: optimiser, schedule, loss variants and data
# loading. Everything else is either set by the spec's own fields (beta, batch sizes, output,
# parallelism) or must not be chosen by whoever writes a DPOJob (push_to_hub and the hub_*
# fields publish the model, report_to sends it elsewhere, deepspeed and trust_remote_code run
# code): an allowlist, so that a field TRL adds later is refused until it is reviewed.
EXTRA_TRAINING_FIELDS = (
    "activation_offloading",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "average_tokens_across_devices",
    "data_seed",
    "dataloader_drop_last",
    "dataloader_num_workers",
    "dataloader_persistent_workers",
    "dataloader_pin_memory",
    "dataloader_prefetch_factor",
    "dataset_num_proc",
    "ddp_bucket_cap_mb",
    "ddp_find_unused_parameters",
    "disable_dropout",
    "discopop_tau",
    "eval_steps",
    "f_alpha_divergence_coef",
    "f_divergence_type",
    "full_determinism",
    "gradient_checkpointing_kwargs",
    "label_smoothing",
    "ld_alpha",
    "logging_first_step",
    "lr_scheduler_kwargs",
    "lr_scheduler_type",
    "max_grad_norm",
    "neftune_noise_alpha",
    "optim",
    "optim_args",
    "pad_to_multiple_of",
    "padding_free",
    "per_device_eval_batch_size",
    "precompute_ref_batch_size",
    "ref_model_mixup_alpha",
    "ref_model_sync_steps",
    "router_aux_loss_coef",
    "save_total_limit",
    "sync_ref_model",
    "tf32",
    "torch_compile",
    "torch_compile_mode",
    "torch_empty_cache_steps",
    "truncation_mode",
    "use_liger_kernel",
    "use_weighting",
    "warmup_steps",
    "weight_decay",
)

# Fields that TRL 1.x removed: say so instead of a bare "unknown field".
REMOVED_FIELDS = {
    "maxPromptLength": "removed in TRL 1.x: prompts are no longer truncated separately; "
    "set spec.dpo.maxLength for the whole sequence",
    "rpoAlpha": "removed in TRL 1.x: for RPO set lossType: [sigmoid, sft] with "
    "lossWeights: [1.0, <alpha>]",
    "tcpxoDaemonImage": "removed: the TCPXO daemon runs with NET_ADMIN and host paths, so the "
    "cluster admin pins its image in the operator's settings (chart value "
    "network.tcpxo.daemonImage); delete the field",
    "fsdpVersion": "removed: fsdp and hsdp always run FSDP2 (FSDP1 is deprecated in PyTorch and "
    "cannot run off a GPU, so it could not be tested); delete the field",
}


# What vLLM serves of a LoRA adapter (vllm.config.LoRAConfig): --max-lora-rank takes one of
# these ranks, and LoRA applies to linear projection layers; adapters of embeddings or the LM
# head are refused when loaded.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
VLLM_MAX_LORA_RANK = VLLM_LORA_RANKS[-1]
VLLM_UNSERVED_MODULES = ("lm_head", "embed_tokens", "wte", "wpe", "embed_in", "embed_out")
