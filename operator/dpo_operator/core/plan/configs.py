"""A model's exact size from its Hugging Face config.json, without torch: the same parameters
transformers builds for each architecture, counted tensor by tensor (attention with grouped
key/value heads and its biases and norms where the architecture has them, dense or mixture-of-
experts MLPs, norms, embeddings and an untied LM head).

The well-known models' configs ship with the operator (`model_configs/`, written from their
published config.json files) and are matched anywhere in a model's name; any other model's
config comes from `dpo plan --model-config`, its directory, or the model initializer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

# Architectures counted here, by config.json's model_type.
DENSE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"}
MIXTURES = {"mixtral", "qwen2_moe", "qwen3_moe"}
SUPPORTED = DENSE | MIXTURES


class UnknownArchitectureError(ValueError):
    """config.json names an architecture this counter does not know."""


@dataclass(frozen=True)
class ConfigCount:
    """What a config.json says of the model's size and shape."""

    parameters: int
    active_parameters: int  # per token: only the experts each token is routed to
    hidden: int
    layers: int
    intermediate: int  # the MLP width a token goes through (top-k experts' together)
    vocab: int
    kv_ratio: float  # key/value width over hidden width
    largest_tensor: int
    experts: int
    experts_per_token: int
    model_type: str


def count_config(config: Mapping[str, Any]) -> ConfigCount:
    """Parameters of the model `config` describes, exactly as transformers builds it."""
    kind = str(config.get("model_type", ""))
    if kind not in SUPPORTED:
        raise UnknownArchitectureError(
            f"model_type {kind or '(none)'} is not one the planner counts ("
            + ", ".join(sorted(SUPPORTED))
            + "): set spec.model.parameters"
        )
    hidden = int(config["hidden_size"])
    layers = int(config["num_hidden_layers"])
    vocab = int(config["vocab_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    tied = bool(config.get("tie_word_embeddings", kind.startswith("gemma")))

    q, kv = heads * head_dim, kv_heads * head_dim
    attention = hidden * q + 2 * hidden * kv + q * hidden
    if kind == "qwen2" or kind == "qwen2_moe" or config.get("attention_bias"):
        attention += q + 2 * kv  # q, k and v biases
        if kind == "llama" and config.get("attention_bias"):
            attention += hidden  # and o's
    if kind.startswith("qwen3"):
        attention += 2 * head_dim  # q_norm and k_norm
    norms = (4 if kind == "gemma2" else 2) * hidden

    dense_width = int(config["intermediate_size"])
    dense_mlp = 3 * hidden * dense_width
    if config.get("mlp_bias"):
        dense_mlp += 2 * dense_width + hidden
    # Every layer with experts has the same ones: count them once.
    sparse = sum(kind in MIXTURES and _sparse(config, layer) for layer in range(layers))
    experts, top_k, width = 1, 1, dense_width
    sparse_mlp = sparse_active = 0
    largest = max(vocab * hidden, hidden * dense_width)
    if sparse:
        experts = int(config.get("num_local_experts") or config["num_experts"])
        top_k = int(config["num_experts_per_tok"])
        routed = int(config.get("moe_intermediate_size") or dense_width)
        expert = 3 * hidden * routed
        shared = 0
        shared_width = int(config.get("shared_expert_intermediate_size") or 0)
        if shared_width:
            shared = 3 * hidden * shared_width + hidden  # the shared expert and its gate
        router = hidden * experts
        sparse_mlp = experts * expert + shared + router
        sparse_active = top_k * expert + shared + router
        # Recent transformers keep a layer's experts in one tensor.
        largest = max(largest, experts * 2 * hidden * routed)
        width = routed * top_k
    common = layers * (attention + norms) + (layers - sparse) * dense_mlp
    embeddings = vocab * hidden * (1 if tied else 2)
    return ConfigCount(
        parameters=common + sparse * sparse_mlp + embeddings + hidden,
        active_parameters=common + sparse * sparse_active + embeddings + hidden,
        hidden=hidden,
        layers=layers,
        intermediate=width,
        vocab=vocab,
        kv_ratio=kv / hidden,
        largest_tensor=largest,
        experts=experts,
        experts_per_token=top_k,
        model_type=kind,
    )


def _sparse(config: Mapping[str, Any], layer: int) -> bool:
    """Whether `layer` has experts: every layer for Mixtral; for Qwen's MoE models every
    decoder_sparse_step-th one outside mlp_only_layers."""
    if config.get("model_type") == "mixtral":
        return True
    step = int(config.get("decoder_sparse_step") or 1)
    return layer not in (config.get("mlp_only_layers") or []) and (layer + 1) % step == 0


def known_configs() -> dict[str, dict[str, Any]]:
    """The shipped configs by name (lower case, matched anywhere in a model's name), longest
    name first, so that llama-3.1-70b is not taken for llama-3.1-7..."""
    folder = resources.files(__package__).joinpath("model_configs")
    found = {
        entry.name.removesuffix(".json"): json.loads(entry.read_text())
        for entry in folder.iterdir()
        if entry.name.endswith(".json")
    }
    return dict(sorted(found.items(), key=lambda item: -len(item[0])))
