"""While a run goes, rank 0's /metrics shows every training metric of docs/architecture.md;
train.json agrees."""

from __future__ import annotations

import json
from pathlib import Path

from dpo_trainer.train.metrics import EVAL_METRICS, TRAIN_METRICS

from tests.trainer.conftest import (
    Samples,
    local_config,
    pod_process,
    start,
    tiny_job,
    watch_metrics,
)


def by_job(samples: Samples) -> dict[str, dict[str, float]]:
    """{metric: {namespace/dpojob: value}}."""
    values: dict[str, dict[str, float]] = {}
    for name, labels, value in samples:
        values.setdefault(name, {})[f"{labels.get('namespace')}/{labels.get('dpojob')}"] = value
    return values


def test_live_metrics_cover_every_training_metric(tmp_path: Path) -> None:
    job = tiny_job(dpo={"maxSteps": 80, "loggingSteps": 2, "saveSteps": 40})
    config = local_config(job, tmp_path)
    command, env = pod_process(job, 0, tmp_path, config)
    process = start(command, env, tmp_path / "run.log")

    def covered(samples: Samples) -> bool:
        seen = by_job(samples)
        step = seen.get("dpo_train_step", {}).get("ml/demo", 0)
        return step >= 10 and all(name in seen for name in TRAIN_METRICS)

    seen = by_job(watch_metrics(process, config.metrics_port, covered))
    assert process.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()[-3000:]

    missing = [name for name in TRAIN_METRICS if name not in seen]
    assert not missing, f"/metrics lacked {missing} during the run"
    for name in TRAIN_METRICS:
        assert set(seen[name]) == {"ml/demo"}, f"{name} is labelled with the job and namespace"
    print(
        "live /metrics during the run:",
        {k: round(v["ml/demo"], 4) for k, v in seen.items() if k in TRAIN_METRICS},
    )

    # Not a terminal: one readable line per logging step instead of a progress bar.
    step_lines = [
        line
        for line in (tmp_path / "run.log").read_text().splitlines()
        if line.startswith("step ") and " loss=" in line
    ]
    assert len(step_lines) == 80 // 2 + 1  # every 2 steps, plus the first step
    assert step_lines[-1].startswith("step 80/80 ")

    summary = json.loads((tmp_path / "artifacts" / "train.json").read_text())
    last_train = [e for e in summary["logHistory"] if "loss" in e][-1]
    last_eval = [e for e in summary["logHistory"] if "eval_loss" in e][-1]
    final = summary["metrics"]
    assert set(TRAIN_METRICS) <= set(final)
    assert set(EVAL_METRICS) <= set(final)
    assert final["dpo_train_loss"] == last_train["loss"]
    assert final["dpo_train_reward_accuracy"] == last_train["rewards/accuracies"]
    assert final["dpo_train_reward_margin"] == last_train["rewards/margins"]
    assert final["dpo_train_step"] == summary["step"] == 80
    assert final["dpo_eval_reward_accuracy"] == last_eval["eval_rewards/accuracies"]
    # Each evaluation's held-out margin comes with its interval (what a sweep stops trials by).
    assert final["dpo_eval_reward_margin_low"] == last_eval["eval_rewards/margins_low"]
    low, high = final["dpo_eval_reward_margin_low"], final["dpo_eval_reward_margin_high"]
    assert low < final["dpo_eval_reward_margin"] < high
