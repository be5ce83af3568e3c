"""How a promoted adapter is served by vLLM: the command line that serves the base model with
it, and the request that loads it into a vLLM already running. Pure: the spec and the promotion
record in, text out (the DPOJob's status carries both, `kubectl describe` shows them).

The adapter is served under its version's name (`status.promotion.version`), never under one
name that moves: vLLM keeps an adapter's prefix-cache blocks by its name, so a new adapter
loaded under an old name would reuse blocks computed with the old weights. vLLM has no alias
for a LoRA module, so there is no `current` name: clients ask for the version the status names.

vLLM reads the adapter's own adapter_config.json for the base model, rank and target modules;
the trainer writes `base_model_name_or_path` as the served name, and the DPOJob's rules keep the
rank and modules within what vLLM serves (see api.VLLM_MAX_LORA_RANK). vLLM loads adapters from
its own disk, so an adapter promoted to an OCI registry is first fetched (and verified) by
`dpo pull` into PULLED_ADAPTERS/<version>, which both lines then name.
"""

from __future__ import annotations

import json
import shlex

from dpo_contract.oci import is_oci

from dpo_operator.api import VLLM_LORA_RANKS, DPOJob, PromotionStatus

VLLM_ADDRESS = "http://VLLM_HOST:8000"  # a placeholder the reader replaces
PULLED_ADAPTERS = "adapters"  # where the serve line pulls an OCI adapter, beside vLLM


def served_model_name(job: DPOJob) -> str:
    promotion = job.spec.promotion
    if promotion is not None and promotion.served_model_name:
        return promotion.served_model_name
    return job.spec.model.name


def vllm_max_lora_rank(rank: int) -> int:
    """The --max-lora-rank an adapter of rank `rank` needs: the smallest vLLM takes that fits."""
    return next(r for r in VLLM_LORA_RANKS if r >= rank)


def with_vllm_instructions(job: DPOJob, promotion: PromotionStatus) -> PromotionStatus:
    """`promotion` with the vLLM serve line and load request for its adapter."""
    if not job.spec.peft.enabled:
        return promotion  # full weights: served as a model of their own, not as a LoRA
    base, name, path = served_model_name(job), promotion.version, promotion.uri
    pull = ""
    if is_oci(promotion.uri):
        path = f"{PULLED_ADAPTERS}/{name}"
        plain = job.spec.promotion is not None and job.spec.promotion.plain_http
        flags = ["--plain-http"] if plain else []
        pull = shlex.join(["dpo", "pull", promotion.uri, path, *flags]) + " && "
    serve = pull + shlex.join(
        [
            "vllm",
            "serve",
            base,
            "--enable-lora",
            "--max-lora-rank",
            str(vllm_max_lora_rank(job.spec.peft.r)),
            "--lora-modules",
            f"{name}={path}",
        ]
    )
    body = json.dumps({"lora_name": name, "lora_path": path}, separators=(",", ":"))
    load = shlex.join(
        [
            "curl",
            "-X",
            "POST",
            f"{VLLM_ADDRESS}/v1/load_lora_adapter",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
        ]
    )
    return promotion.model_copy(update={"vllm_serve": serve, "vllm_load_request": load})
