"""The adapter itself, checked before it is scored: the one that was trained, complete, and
servable. Integrity (the manifest's sha256 of each file) says the files are the ones written;
these say the files hold the adapter. A save that kept one rank's slice of each tensor (as
accelerate's FSDP2 LoRA save did before its PR #4206) passes integrity and fails here.

- shapes: every tensor PEFT creates from the saved adapter_config.json on this base model is
  there, with that shape, and nothing else is;
- matchesTrained: the tensors equal those gathered from every rank when training ended
  (train.json's `trainedAdapter.tensorsDigest`);
- loraBTrained: not every lora_B is zero (PEFT starts them at zero: all zero means untrained);
- baseModel: the base model and revision the gate loads are the ones trained on;
- changesLogits: the adapter applied to the base changes its logits on held-out prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from dpo_contract.config import TrainerConfig
from dpo_contract.reports import ArtifactCheck, TrainedAdapter

from dpo_trainer.io.adapters import ADAPTER_WEIGHTS, read_adapter_tensors, tensors_digest
from dpo_trainer.io.models import build_on_meta

# Logits that move less than this are the base's own (bf16 rounding moves them by more).
LOGITS_UNCHANGED = 1e-6


def check_saved_adapter(
    adapter: Path, config: TrainerConfig, trained: TrainedAdapter | None
) -> list[ArtifactCheck]:
    """The checks that need only the files (and the base model's shapes)."""
    tensors = read_adapter_tensors(adapter)
    return [
        _shapes(tensors, _expected_shapes(adapter, config)),
        _matches_trained(tensors, trained),
        _lora_b_trained(tensors),
        _base_model(config, trained),
    ]


def _expected_shapes(adapter: Path, config: TrainerConfig) -> dict[str, tuple[int, ...]]:
    """Each adapter tensor's name and shape as PEFT makes them from the saved config on the
    base model, built on the meta device (nothing allocated)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    base = build_on_meta(
        config.model, trust_remote_code=config.trust_remote_code, dtype=torch.float32
    )
    settings = LoraConfig.from_pretrained(str(adapter))
    settings.inference_mode = True
    made = get_peft_model(base, settings)
    return {name: tuple(t.shape) for name, t in get_peft_model_state_dict(made).items()}


def _shapes(
    tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]
) -> ArtifactCheck:
    problems = []
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
    if extra:
        problems.append(f"{len(extra)} tensor(s) the config does not make, e.g. {extra[0]}")
    wrong = [
        (name, tuple(tensors[name].shape), shape)
        for name, shape in sorted(expected.items())
        if name in tensors and tuple(tensors[name].shape) != shape
    ]
    if wrong:
        name, saved, shape = wrong[0]
        problems.append(
            f"{len(wrong)} tensor(s) of the wrong shape, e.g. {name} is {list(saved)} where the "
            f"config implies {list(shape)} (a part of the tensor, as one rank's shard is)"
        )
    if problems:
        return ArtifactCheck(
            name="shapes", passed=False, detail=f"{ADAPTER_WEIGHTS}: " + "; ".join(problems)
        )
    return ArtifactCheck(
        name="shapes",
        passed=True,
        detail=f"all {len(expected)} tensors have the shapes adapter_config.json implies",
    )


def _matches_trained(
    tensors: dict[str, torch.Tensor], trained: TrainedAdapter | None
) -> ArtifactCheck:
    if trained is None:
        return ArtifactCheck(
            name="matchesTrained",
            passed=False,
            detail="train.json records no trained adapter to compare with (a run of an older "
            "trainer, or not a LoRA run): train it again",
        )
    saved = tensors_digest(tensors)
    if saved != trained.tensors_digest:
        return ArtifactCheck(
            name="matchesTrained",
            passed=False,
            detail=f"the saved tensors (sha256 {saved[:12]}) are not the {trained.tensors} "
            f"tensors gathered from every rank when training ended ({trained.tensors_digest[:12]})",
        )
    return ArtifactCheck(
        name="matchesTrained",
        passed=True,
        detail=f"the {trained.tensors} tensors equal those gathered when training ended",
    )


def _lora_b_trained(tensors: dict[str, torch.Tensor]) -> ArtifactCheck:
    b = [t for name, t in tensors.items() if ".lora_B." in name]
    zero = sum(1 for t in b if not bool(t.any()))
    if not b or zero == len(b):
        return ArtifactCheck(
            name="loraBTrained",
            passed=False,
            detail=f"all {len(b)} lora_B matrices are zero: the adapter is the untrained one",
        )
    return ArtifactCheck(
        name="loraBTrained", passed=True, detail=f"{len(b) - zero} of {len(b)} lora_B non-zero"
    )


def _base_model(config: TrainerConfig, trained: TrainedAdapter | None) -> ArtifactCheck:
    loaded = f"{config.model.name}@{config.model.revision or 'default'}"
    if trained is None:
        return ArtifactCheck(
            name="baseModel", passed=False, detail=f"nothing recorded to compare with {loaded}"
        )
    on = f"{trained.base_model}@{trained.revision or 'default'}"
    return ArtifactCheck(
        name="baseModel",
        passed=on == loaded,
        detail=f"trained on {on}" if on == loaded else f"trained on {on}, the gate loads {loaded}",
    )


def changes_logits(model: Any, inputs: list[list[int]], device: torch.device) -> ArtifactCheck:
    """With the adapter on and off (PEFT's `disable_adapter`), the largest change of any logit
    on the held-out sequences `inputs`."""
    largest = 0.0
    with torch.no_grad():
        for ids in inputs:
            batch = torch.tensor([ids], device=device)
            adapted = model(input_ids=batch).logits.float()
            with model.disable_adapter():
                base = model(input_ids=batch).logits.float()
            largest = max(largest, float((adapted - base).abs().max()))
    passed = largest > LOGITS_UNCHANGED
    return ArtifactCheck(
        name="changesLogits",
        passed=passed,
        detail=f"the adapter moves logits on {len(inputs)} held-out prompts by up to "
        f"{largest:.3g}" + ("" if passed else ": it changes nothing"),
    )
