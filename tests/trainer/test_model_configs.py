"""The operator's count (no torch) is what transformers really builds: every shipped config,
Llama 3.1 405B and the mixtures of experts included, built on the meta device (nothing
allocated) and its parameters counted."""

from __future__ import annotations

import pytest
import torch
from dpo_operator.core.plan.configs import count_config, known_configs
from transformers import AutoConfig, AutoModelForCausalLM


@pytest.mark.parametrize("name", sorted(known_configs()))
def test_the_operators_count_is_the_models_built_on_the_meta_device(name: str) -> None:
    shipped = known_configs()[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**shipped))
    built = sum(parameter.numel() for parameter in model.parameters())
    assert count_config(shipped).parameters == built
