"""SIGTERM mid-run, then the same command again: the run resumes and matches an unbroken one."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from dpo_contract.reports import TrainingReport
from dpo_trainer.io.checkpoints import COMPLETE_MARKER
from dpo_trainer.train.run import EXIT_INTERRUPTED, train

from tests.trainer.conftest import local_config, pod_process, start, tiny_job

# Per-step losses of the resumed run equal the uninterrupted run's to this absolute tolerance
# (the same seed, data order, RNG state and optimizer state are restored from the checkpoint).
LOSS_TOLERANCE = 1e-4
RESUME_DPO = {"maxSteps": 30, "loggingSteps": 1, "saveSteps": 5}


def losses(summary: TrainingReport) -> dict[int, float]:
    return {
        int(entry["step"]): float(entry["loss"])  # type: ignore[arg-type]
        for entry in summary.log_history
        if "loss" in entry
    }


def test_a_killed_run_resumes_from_its_checkpoint_and_matches(tmp_path: Path) -> None:
    job = tiny_job(dpo=RESUME_DPO)
    unbroken = train(local_config(job, tmp_path / "unbroken"))

    workdir = tmp_path / "killed"
    workdir.mkdir()
    config = local_config(job, workdir)
    command, env = pod_process(job, 0, workdir, config)
    checkpoints = workdir / "artifacts" / "checkpoints"

    process = start(command, env, workdir / "first.log")
    deadline = time.monotonic() + 240
    while not (checkpoints / "checkpoint-10" / COMPLETE_MARKER).exists():
        assert process.poll() is None, (workdir / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint-10 in time"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # what the kubelet does to PID 1
    assert process.wait(timeout=120) == EXIT_INTERRUPTED, (workdir / "first.log").read_text()[
        -3000:
    ]
    interrupted = json.loads((workdir / "termination-0.json").read_text())
    assert interrupted["status"] == "interrupted"
    saved = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    stopped_at = saved[-1]
    assert 10 <= stopped_at < 30, f"checkpoint written on SIGTERM at {stopped_at}"
    assert not (workdir / "artifacts" / "adapter").exists(), "no adapter from an unfinished run"

    second = start(command, env, workdir / "second.log")
    assert second.wait(timeout=300) == 0, (workdir / "second.log").read_text()[-3000:]
    resumed = TrainingReport.model_validate_json((workdir / "artifacts" / "train.json").read_text())
    log_text = (workdir / "second.log").read_text()
    assert f"resuming from {checkpoints / f'checkpoint-{stopped_at}'}" in log_text
    first_logged_step = min(step for step in losses(resumed) if step > stopped_at)
    assert first_logged_step == stopped_at + 1, "the step count continues"
    assert resumed.step == 30

    expected, actual = losses(unbroken), losses(resumed)
    after_resume = [step for step in actual if step > stopped_at]
    worst = max(abs(actual[s] - expected[s]) for s in after_resume)
    print(
        f"stopped at step {stopped_at}; resumed steps {after_resume[0]}..{after_resume[-1]}; "
        f"largest loss difference vs. unbroken run {worst:.2e} (tolerance {LOSS_TOLERANCE})"
    )
    assert worst <= LOSS_TOLERANCE

    # Once finished, the same command again reports the result and trains nothing.
    adapter = workdir / "artifacts" / "adapter" / "adapter_model.safetensors"
    written = adapter.stat().st_mtime_ns
    third = start(command, env, workdir / "third.log")
    assert third.wait(timeout=300) == 0
    assert "already finished" in (workdir / "third.log").read_text()
    assert adapter.stat().st_mtime_ns == written, "the final adapter is produced once"
