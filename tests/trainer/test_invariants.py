"""Training invariants: batch shape does not change training; the loss is DPO's closed form."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from dpo_contract.fields import DPO_LOSS_TYPES
from dpo_contract.reports import TrainingReport
from dpo_trainer.io.data import load_preferences
from dpo_trainer.io.models import load_model, load_tokenizer
from dpo_trainer.train.run import train
from dpo_trainer.train.trl_trainer import training_arguments
from trl import DPOConfig, DPOTrainer

from tests.trainer.conftest import local_config, tiny_job

# Per-step losses of 4x1 and 1x4 batches agree to this absolute tolerance (float32 sums in a
# different order; padding differs, masked out).
BATCH_SHAPE_TOLERANCE = 1e-5
# TRL's loss against a float64 numpy implementation on the same log-probs.
CLOSED_FORM_TOLERANCE = 1e-5


def step_losses(summary: TrainingReport) -> list[float]:
    return [float(entry["loss"]) for entry in summary.log_history if "loss" in entry]  # type: ignore[arg-type]


def test_batch_four_equals_accumulating_four_batches_of_one(tmp_path: Path) -> None:
    shapes = {"4x1": (4, 1), "1x4": (1, 4)}
    losses = {}
    for name, (batch, accumulation) in shapes.items():
        job = tiny_job(
            peft={"dropout": 0.0},
            dpo={
                "perDeviceBatchSize": batch,
                "gradientAccumulationSteps": accumulation,
                "maxSteps": 6,
                "loggingSteps": 1,
                "saveSteps": 100,
            },
        )
        losses[name] = step_losses(train(local_config(job, tmp_path / name)))
    difference = float(np.max(np.abs(np.array(losses["4x1"]) - np.array(losses["1x4"]))))
    print(
        f"per-step losses 4x1 {np.round(losses['4x1'], 5)}; largest difference vs 1x4 "
        f"{difference:.2e} (tolerance {BATCH_SHAPE_TOLERANCE})"
    )
    assert len(losses["4x1"]) == 6
    assert difference <= BATCH_SHAPE_TOLERANCE


def sequence_log_probs(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Sum of completion-token log-probs per sequence, computed independently of TRL."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    labels = batch["input_ids"][:, 1:]
    per_token = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (per_token * batch["completion_mask"][:, 1:]).sum(dim=-1)


def test_loss_and_rewards_match_the_closed_form(tmp_path: Path) -> None:
    beta = 0.5
    config = local_config(tiny_job(peft={"enabled": False}, dpo={"beta": beta}), tmp_path)
    tokenizer = load_tokenizer(config.model, trust_remote_code=False)
    policy = load_model(config.model, trust_remote_code=False, dtype=torch.float32)
    reference = load_model(config.model, trust_remote_code=False, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference so margins are not zero
        for parameter in policy.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    rows, _ = load_preferences(config.data.train, config.data.columns, config.data.format)
    args = training_arguments(config, str(tmp_path / "out"), torch.float32)
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(rows[:32]),
        eval_dataset=Dataset.from_list(rows[32:40]),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    policy.eval()
    with torch.no_grad():
        loss = float(trainer.compute_loss(trainer.model, batch))

    policy_chosen, policy_rejected = sequence_log_probs(policy, batch).chunk(2)
    ref_chosen, ref_rejected = sequence_log_probs(reference, batch).chunk(2)
    chosen_rewards = beta * (policy_chosen - ref_chosen).numpy()
    rejected_rewards = beta * (policy_rejected - ref_rejected).numpy()
    margins = chosen_rewards - rejected_rewards
    expected_loss = float(np.mean(np.logaddexp(0.0, -margins)))  # -log sigmoid(margin)

    # TRL files the metrics of a forward pass under the model's mode: eval here.
    logged = {key: values[-1] for key, values in trainer._metrics["eval"].items()}
    print(f"loss TRL {loss:.8f} numpy {expected_loss:.8f}; margin {margins.mean():.6f}")
    assert abs(margins.mean()) > 1e-3, "the check needs non-zero margins"
    assert loss == pytest.approx(expected_loss, abs=CLOSED_FORM_TOLERANCE)
    assert logged["rewards/chosen"] == pytest.approx(chosen_rewards.mean(), abs=1e-5)
    assert logged["rewards/rejected"] == pytest.approx(rejected_rewards.mean(), abs=1e-5)
    assert logged["rewards/margins"] == pytest.approx(margins.mean(), abs=1e-5)
    assert logged["rewards/accuracies"] == pytest.approx(float(np.mean(margins > 0)), abs=1e-6)


def test_our_loss_types_are_exactly_what_trl_accepts() -> None:
    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    trl_loss_types = re.findall(r"'(\w+)'", help_text.split("If multiple")[0])
    assert sorted(trl_loss_types) == sorted(DPO_LOSS_TYPES)
