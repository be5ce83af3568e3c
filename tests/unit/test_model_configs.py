"""Exact model sizes from config.json (dpo_operator.core.plan.configs), without torch: the
shipped configs of real models, written from their published config.json files, against the
parameter counts their publishers state; the trainer tier checks the same counts against the
models transformers builds on the meta device."""

from __future__ import annotations

import pytest
from dpo_operator.core.plan.configs import (
    UnknownArchitectureError,
    count_config,
    known_configs,
)

# Parameter counts as the model cards state them (rounded as they round them).
PUBLISHED = {
    "llama-3.1-8b": 8.03e9,
    "llama-3.1-70b": 70.6e9,
    "llama-3.1-405b": 406e9,
    "qwen3-8b": 8.19e9,
    "qwen3-32b": 32.8e9,
    "qwen3-30b-a3b": 30.5e9,
    "mixtral-8x7b": 46.7e9,
    "mistral-7b": 7.25e9,  # v0.3 (32768 tokens), the one people fine-tune today
    "gemma-2-9b": 9.24e9,
    "gemma-2-27b": 27.2e9,
    "qwen2.5-7b": 7.61e9,
    "llama-3.2-1b": 1.24e9,
}
# Mixtures of experts: parameters a token goes through (Qwen3-30B-"A3B": 3.3B active).
ACTIVE = {"qwen3-30b-a3b": 3.3e9, "mixtral-8x7b": 12.9e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_each_shipped_config_counts_its_published_parameters(name: str) -> None:
    count = count_config(known_configs()[name])
    print(f"{name}: {count.parameters:,} (published {PUBLISHED[name]:.3g})")
    assert count.parameters == pytest.approx(PUBLISHED[name], rel=0.005)
    assert count.active_parameters == pytest.approx(ACTIVE.get(name, PUBLISHED[name]), rel=0.02)


def test_experts_are_counted_all_for_memory_and_top_k_per_token() -> None:
    qwen_moe = count_config(known_configs()["qwen3-30b-a3b"])
    assert (qwen_moe.experts, qwen_moe.experts_per_token) == (128, 8)
    assert qwen_moe.intermediate == 8 * 768, "a token's MLP width: its 8 experts'"
    # One layer's 128 experts in one tensor (gate and up): larger than the embeddings.
    assert qwen_moe.largest_tensor == 128 * 2 * 2048 * 768


def test_an_architecture_it_does_not_know_is_named_with_what_to_do() -> None:
    with pytest.raises(
        UnknownArchitectureError, match=r"model_type mamba .* set spec.model.parameters"
    ):
        count_config({"model_type": "mamba", "hidden_size": 768})


def test_every_known_model_name_is_a_shipped_config() -> None:
    """The old table of names is now these configs: the names users write still match."""
    names = known_configs()
    assert {"llama-3.1-8b", "qwen3-8b", "qwen3-32b", "mixtral-8x7b", "gemma-2-9b"} <= set(names)
    lengths = [len(name) for name in names]
    assert lengths == sorted(lengths, reverse=True), "longest first: 70b never read as 7b"
