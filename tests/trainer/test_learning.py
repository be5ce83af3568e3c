"""Real DPO runs on CPU learn the synthetic preference: held-out reward accuracy rises."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from dpo_contract.reports import TrainingReport
from dpo_trainer.io import models
from dpo_trainer.train.run import train

from tests.trainer.conftest import local_config, tiny_job


def held_out_accuracy(summary: TrainingReport) -> tuple[float, float]:
    """(first, last) held-out reward accuracy logged during the run."""
    evals = [e["eval_rewards/accuracies"] for e in summary.log_history if "eval_loss" in e]
    return float(evals[0]), summary.eval["eval_rewards/accuracies"]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("peft", "dpo"),
    [
        pytest.param({"enabled": True}, {"lossType": ["sigmoid"]}, id="lora-sigmoid"),
        pytest.param(
            {"enabled": False}, {"lossType": ["sigmoid"], "learningRate": 2e-4}, id="full-sigmoid"
        ),
        pytest.param({"enabled": True}, {"lossType": ["ipo"]}, id="lora-ipo"),
        pytest.param(
            {"enabled": True}, {"lossType": ["sigmoid_norm"], "beta": 2.0}, id="lora-sigmoid-norm"
        ),
        pytest.param(
            {"enabled": True},
            {"lossType": ["sigmoid", "sft"], "lossWeights": [1.0, 0.5]},
            id="lora-rpo",
        ),
    ],
)
def test_dpo_raises_held_out_reward_accuracy(
    tmp_path: Path, peft: dict[str, Any], dpo: dict[str, Any]
) -> None:
    summary = train(local_config(tiny_job(peft=peft, dpo=dpo), tmp_path))
    first, last = held_out_accuracy(summary)
    print(f"held-out reward accuracy: step 20 {first:.3f} -> step {summary.step} {last:.3f}")
    assert summary.status == "completed"
    assert last >= 0.8, f"held-out reward accuracy only reached {last:.3f}"


def test_simpo_is_reference_free_and_learns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[str] = []
    real_load = models.load_model

    def counting_load(ref: Any, **kwargs: Any) -> Any:
        loaded.append(ref.name)
        return real_load(ref, **kwargs)

    monkeypatch.setattr("dpo_trainer.train.run.load_model", counting_load)
    job = tiny_job(
        dpo={"lossType": ["simpo"], "beta": 2.0, "simpoGamma": 0.5},
        evalGate={"maxAnchorNllIncrease": None},
    )
    summary = train(local_config(job, tmp_path))
    accuracy = summary.eval["eval_rewards/accuracies"]
    print(f"SimPO held-out reward accuracy {accuracy:.3f}; models loaded: {loaded}")
    assert loaded == ["builtin:tiny-llama"], "only the policy is loaded: no reference model"
    assert accuracy >= 0.8
