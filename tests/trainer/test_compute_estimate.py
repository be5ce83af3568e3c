"""The plan's compute estimate against a real run: the FLOPs it predicts for the tokens a CPU
run really processed, at this CPU's measured matmul rate, within an order of magnitude of the
time the run took."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from dpo_operator.core.plan import model_shape
from dpo_operator.core.plan.compute import flops_per_token
from dpo_trainer.train.run import train

from tests.trainer.conftest import local_config, tiny_job

STEPS = 4


def matmul_flops_per_second() -> float:
    """What this CPU does at best: float32 matmuls as large as the model's."""
    size = 1024
    a, b = torch.rand(size, size), torch.rand(size, size)
    torch.mm(a, b)
    started = time.perf_counter()
    runs = 10
    for _ in range(runs):
        torch.mm(a, b)
    return 2 * size**3 * runs / (time.perf_counter() - started)


def test_the_flops_estimate_is_the_measured_cpu_runs_order_of_magnitude(tmp_path: Path) -> None:
    job = tiny_job(
        model={"name": "builtin:small-llama"},
        peft={"enabled": False},
        dpo={"maxSteps": STEPS, "loggingSteps": 1, "saveSteps": STEPS, "learningRate": 1e-5},
    )
    shape = model_shape(job.spec)
    assert shape is not None
    report = train(local_config(job, tmp_path))
    end = next(entry for entry in report.log_history if "train_runtime" in entry)
    tokens = max(float(e["num_tokens"]) for e in report.log_history if "num_tokens" in e)
    rate = matmul_flops_per_second()
    predicted = flops_per_token(job.spec, shape) * tokens / rate
    measured = float(end["train_runtime"])
    print(
        f"{tokens:.0f} tokens, {flops_per_token(job.spec, shape) / 1e6:.0f} MFLOP per token, "
        f"CPU {rate / 1e9:.0f} GFLOP/s: predicted {predicted:.2f} s, measured {measured:.2f} s "
        f"(utilisation {predicted / measured:.0%})"
    )
    assert 0.1 <= measured / predicted <= 10
