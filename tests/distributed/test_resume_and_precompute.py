"""A crashed FSDP/HSDP run resumes from its sharded checkpoint; precomputed reference log-probs
work with several processes and pods, and train like a live reference."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.distributed.conftest import (
    DDP_TWO_PODS,
    FSDP,
    HSDP,
    SAVE_STEPS,
    STEPS,
    PodLayout,
    Run,
    crash,
    distributed_job,
    launch,
)

# Losses of a resumed or precomputed run and the uninterrupted live-reference run agree to this
# absolute tolerance (model, optimizer, scheduler, RNG and data position restored; reference
# log-probs computed in other batches).
LOSS_TOLERANCE = 1e-4


def learning_rates(run: Run) -> dict[int, float]:
    return {e["step"]: e["learning_rate"] for e in run.summary()["logHistory"] if "loss" in e}


def largest_difference(run: Run, baseline: Run, steps: range) -> float:
    actual, expected = run.losses(), baseline.losses()
    return max(abs(actual[step] - expected[step]) for step in steps)


@pytest.mark.parametrize(
    ("layout", "kind", "bucket"),
    [(FSDP, "full", False), (HSDP, "lora", True)],
    ids=["fsdp-full-mounted-volume", "hsdp-lora-object-store"],
)
def test_a_crashed_run_resumes_from_its_sharded_checkpoint_and_matches(
    runs: dict[tuple[str, str], Run], tmp_path: Path, layout: PodLayout, kind: str, bucket: bool
) -> None:
    job = distributed_job(layout, lora=kind == "lora")
    crashed = crash(job, tmp_path, SAVE_STEPS, bucket=bucket)
    assert not (crashed.artifacts / "train.json").exists()

    resumed = launch(job, tmp_path, bucket=bucket)
    resumed.assert_succeeded()
    checkpoint = f"checkpoint-{SAVE_STEPS}"
    for pod in range(layout.nodes):
        assert re.search(rf"resuming from \S+/checkpoints/{checkpoint} ", resumed.log(pod))
    baseline = runs[(layout.strategy, kind)]
    worst = largest_difference(resumed, baseline, range(SAVE_STEPS + 1, STEPS + 1))
    print(
        f"{layout.strategy} {kind}: crashed after {checkpoint}; steps {SAVE_STEPS + 1}..{STEPS} "
        f"differ from the uninterrupted run by at most {worst:.2e} (tolerance {LOSS_TOLERANCE})"
    )
    assert worst <= LOSS_TOLERANCE
    assert learning_rates(resumed) == learning_rates(baseline), "the scheduler went on"
    assert resumed.summary()["step"] == STEPS


@pytest.mark.parametrize(
    ("layout", "kind", "baseline", "bucket"),
    [
        (DDP_TWO_PODS, "lora", "single", False),
        (FSDP, "lora", "fsdp", False),
        (HSDP, "full", "hsdp", True),
    ],
    ids=["ddp-across-pods-lora", "fsdp-in-a-pod-lora", "hsdp-across-pods-full"],
)
def test_precomputed_reference_log_probs_train_like_a_live_reference(
    runs: dict[tuple[str, str], Run],
    tmp_path: Path,
    layout: PodLayout,
    kind: str,
    baseline: str,
    bucket: bool,
) -> None:
    run = launch(
        distributed_job(layout, lora=kind == "lora", precompute=True), tmp_path, bucket=bucket
    )
    run.assert_succeeded()
    logs = "".join(run.log(pod) for pod in range(layout.nodes))
    assert logs.count("precomputed reference log-probs for 512 train pairs") == layout.world_size
    worst = largest_difference(run, runs[(baseline, kind)], range(1, STEPS + 1))
    print(
        f"{layout.strategy} x{layout.world_size} {kind} with precomputed reference: largest loss "
        f"difference vs a live reference {worst:.2e} (tolerance {LOSS_TOLERANCE})"
    )
    assert worst <= LOSS_TOLERANCE
