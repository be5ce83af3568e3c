"""The rule that keeps LoRA off what vLLM cannot serve (embeddings, the head) refuses exactly
the peft.targetModules that make PEFT itself wrap one of them: PEFT matches an entry to a
module's full name or to a suffix after a '.', and so does the rule."""

from __future__ import annotations

from pathlib import Path

import torch
from dpo_operator.core.validate import parse_dpojob
from dpo_trainer.io.builtin import builtin_model_path
from peft import LoraConfig, get_peft_model
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from tests.conftest import minimal_manifest, set_fields

TARGETS = [
    ["q_proj"],
    ["self_attn.q_proj"],
    ["embed_tokens"],
    ["model.embed_tokens"],
    ["q_proj", "lm_head"],
    ["layers.0.self_attn.v_proj"],
    ["tokens"],  # a suffix, but not after a '.': PEFT wraps nothing by it
]


def peft_wraps_an_unserved_module(model_dir: Path, targets: list[str]) -> bool:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    try:
        wrapped = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    except ValueError:
        return False  # PEFT found no module to wrap
    names = [name for name, module in wrapped.named_modules() if hasattr(module, "lora_A")]
    return any(name.endswith(("embed_tokens", "lm_head")) for name in names)


def the_rule_refuses(targets: list[str]) -> bool:
    manifest = set_fields(
        minimal_manifest(),
        **{"peft.targetModules": targets, "promotion": {"target": "pvc://models/a"}},
    )
    try:
        parse_dpojob(manifest, check_memory=False)
    except ValidationError as error:
        return "spec.peft.targetModules" in str(error) or "targetModules" in str(error)
    return False


def test_the_rule_refuses_what_peft_would_wrap(tmp_path: Path) -> None:
    model_dir = builtin_model_path("builtin:tiny-llama", tmp_path)
    verdicts = {
        ",".join(targets): (
            the_rule_refuses(targets),
            peft_wraps_an_unserved_module(model_dir, targets),
        )
        for targets in TARGETS
    }
    assert all(rule == peft for rule, peft in verdicts.values()), verdicts
    refused = [targets for targets, (rule, _) in verdicts.items() if rule]
    assert refused == ["embed_tokens", "model.embed_tokens", "q_proj,lm_head"]
