"""Real CPU runs that provoke each of DPO's failure modes raise the health signal for it, live on
/metrics and in train.json; with `health.action: stop` the run ends on its last healthy
checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dpo_contract.pod import BadInputError
from dpo_contract.reports import TrainingReport
from dpo_trainer.train.run import train
from safetensors.torch import load_file

from tests.trainer.conftest import (
    Samples,
    local_config,
    pod_process,
    start,
    tiny_job,
    watch_metrics,
)

# Coin-flip labels: each pair is swapped with probability 0.5, so there is nothing to learn.
NOISY_DATA = {"train": {"uri": "builtin:synthetic-preferences/train?noise=0.5"}}
# A full fine-tune at a learning rate three orders of magnitude too high.
FAR_TOO_HOT = {"enabled": False}


def signals_holding(samples: Samples) -> set[str]:
    """The reasons dpo_train_degraded shows at 1."""
    return {
        labels["reason"]
        for name, labels, value in samples
        if name == "dpo_train_degraded" and value == 1
    }


def reasons(report: TrainingReport) -> set[str]:
    return {signal.reason for signal in report.health}


def test_coin_flip_pairs_raise_accuracy_stuck_live_while_training_goes_on(tmp_path: Path) -> None:
    job = tiny_job(data=NOISY_DATA, dpo={"maxSteps": 60, "loggingSteps": 2, "saveSteps": 30})
    config = local_config(job, tmp_path)
    command, env = pod_process(job, 0, tmp_path, config)
    process = start(command, env, tmp_path / "run.log")
    degraded = signals_holding(watch_metrics(process, config.metrics_port, signals_holding))
    assert process.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert degraded == {"AccuracyStuck"}, "dpo_train_degraded shows the signal while it holds"
    report = TrainingReport.model_validate_json(
        (Path(config.artifacts_dir) / "train.json").read_text()
    )
    assert report.step == 60, "warn (the default) trains on"
    assert reasons(report) == {"AccuracyStuck"}
    assert "not above 0.5" in report.health[0].message
    termination = json.loads((tmp_path / "termination-0.json").read_text())
    assert [signal["reason"] for signal in termination["health"]] == ["AccuracyStuck"]
    assert "health: AccuracyStuck" in (tmp_path / "run.log").read_text()


def test_a_learning_rate_far_too_high_explodes_the_gradients_and_collapses_margins(
    tmp_path: Path,
) -> None:
    job = tiny_job(
        peft=FAR_TOO_HOT,
        dpo={"lossType": ["ipo"], "learningRate": 0.5, "loggingSteps": 1, "maxSteps": 20},
    )
    report = train(local_config(job, tmp_path))
    print({signal.reason: signal.message for signal in report.health})
    assert {"GradientExplosion", "MarginsCollapsed"} <= reasons(report)
    assert "x its median" in next(
        s.message for s in report.health if s.reason == "GradientExplosion"
    )


def test_chosen_rewards_sinking_under_rising_margins_is_likelihood_displacement(
    tmp_path: Path,
) -> None:
    report = train(local_config(tiny_job(peft=FAR_TOO_HOT, dpo={"learningRate": 0.5}), tmp_path))
    assert "LikelihoodDisplacement" in reasons(report)
    assert report.stopped_early is None
    assert report.step == 40


def test_stop_ends_on_the_signal_and_keeps_the_last_checkpoint_saved_before_it(
    tmp_path: Path,
) -> None:
    job = tiny_job(
        peft=FAR_TOO_HOT, dpo={"learningRate": 0.5, "saveSteps": 5}, health={"action": "stop"}
    )
    config = local_config(job, tmp_path)
    report = train(config)
    stopped = report.stopped_early
    assert stopped is not None
    assert stopped.reason == "LikelihoodDisplacement"
    assert report.step == stopped.step < 40, "training ended at the signal"
    assert stopped.kept_step == stopped.step - 5
    artifacts = Path(config.artifacts_dir)
    saved = sorted(p.name for p in (artifacts / "checkpoints").iterdir())
    assert f"checkpoint-{stopped.step}" not in saved, "no checkpoint of the degraded step"
    kept = load_file(
        artifacts / "checkpoints" / f"checkpoint-{stopped.kept_step}" / "model.safetensors"
    )
    adapter = load_file(artifacts / "adapter" / "model.safetensors")
    assert kept.keys() == adapter.keys()
    assert all(torch.equal(kept[name], adapter[name]) for name in kept), (
        "the adapter is the kept checkpoint's weights"
    )


def test_a_nan_loss_before_any_checkpoint_stops_with_nothing_to_keep(tmp_path: Path) -> None:
    # Adam with epsilon 0 divides 0 by 0 for a parameter whose gradient is 0: NaN weights.
    job = tiny_job(
        dpo={"loggingSteps": 1, "saveSteps": 10, "extra": {"adam_epsilon": 0.0}},
        health={"action": "stop"},
    )
    config = local_config(job, tmp_path)
    with pytest.raises(BadInputError) as refused:
        train(config)
    message = str(refused.value)
    assert "NonFiniteLoss" in message
    assert "before its first checkpoint (dpo.saveSteps 10)" in message
    assert "lower learningRate" in message
    assert not (Path(config.artifacts_dir) / "adapter").exists()
