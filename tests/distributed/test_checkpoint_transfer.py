"""Checkpoints without a shared disk: each rank sends only the files it wrote and fetches only
what it reads, beside training and outside any collective, so a slow upload slows nobody; and
training steps have a timeout of their own, short, so a hung pod fails the run in seconds."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from dpo_contract.reports import RankCheckpoints, TrainingReport
from dpo_trainer.io.checkpoints import COMPLETE_MARKER, RANK_MARKERS
from dpo_trainer.train.run import EXIT_INTERRUPTED

from tests.distributed.conftest import (
    FSDP,
    SAVE_STEPS,
    STEPS,
    PodLayout,
    Run,
    crash,
    distributed_job,
    launch,
    logged,
    new_pods,
    prepare,
    signal_pods,
    start_pods,
    wait_while_running,
)
from tests.distributed.test_resume_and_precompute import (
    LOSS_TOLERANCE,
    largest_difference,
    learning_rates,
)
from tests.object_store import ObjectStore
from tests.throttle import throttled

FSDP_TWO_PODS = PodLayout("fsdp", 2, 2)
FSDP_ONE_EACH = PodLayout("fsdp", 2, 1)
# A rank's share of a checkpoint against an even 1/N: rank 0 also sends the small files every
# rank reads (DCP's metadata, the Trainer's state, the scheduler).
SHARE_TOLERANCE = 1.5


def checkpoint_bytes(folder: Path) -> int:
    """What a checkpoint holds, without its markers."""
    return sum(
        path.stat().st_size
        for path in folder.rglob("*")
        if path.is_file() and RANK_MARKERS not in path.parts and path.name != COMPLETE_MARKER
    )


def per_rank(report: TrainingReport) -> list[RankCheckpoints]:
    return report.checkpoints_by_rank


def test_each_rank_sends_and_fetches_only_its_share(
    runs: dict[tuple[str, str], Run], tmp_path: Path
) -> None:
    """fsdp over 2 pods x 2 with the artifacts in a store: killed once checkpoint 4 is complete,
    resumed in new pods. Every rank fetched about a quarter of checkpoint 4 and sent about a
    quarter of checkpoint 8, and the losses go on as the uninterrupted run's."""
    job = distributed_job(FSDP_TWO_PODS, lora=False)
    crash(job, tmp_path, SAVE_STEPS, bucket=True)
    resumed = launch(job, tmp_path, bucket=True)
    resumed.assert_succeeded()
    for pod in range(FSDP_TWO_PODS.nodes):
        assert re.search(rf"resuming from \S+/checkpoint-{SAVE_STEPS} ", resumed.log(pod))
    report = TrainingReport.model_validate(resumed.summary())
    checkpoints = resumed.artifacts / "checkpoints"
    world = FSDP_TWO_PODS.world_size
    fetched_from = checkpoint_bytes(checkpoints / f"checkpoint-{SAVE_STEPS}")
    sent = checkpoint_bytes(checkpoints / f"checkpoint-{STEPS}")
    ranks = per_rank(report)
    uploads = [r.uploaded_bytes for r in ranks]
    downloads = [r.downloaded_bytes for r in ranks]
    print(
        f"checkpoint {STEPS}: {sent} bytes, sent per rank {uploads}; checkpoint {SAVE_STEPS}: "
        f"{fetched_from} bytes, fetched per rank {downloads}"
    )
    assert sum(uploads) == sent, "every file sent once, by the rank that wrote it"
    assert max(uploads) <= SHARE_TOLERANCE * sent / world
    assert min(uploads) >= sent / world / SHARE_TOLERANCE
    assert max(downloads) <= SHARE_TOLERANCE * fetched_from / world
    assert min(downloads) >= fetched_from / world / SHARE_TOLERANCE
    worst = largest_difference(resumed, runs[("fsdp", "full")], range(SAVE_STEPS + 1, STEPS + 1))
    print(f"steps {SAVE_STEPS + 1}..{STEPS} differ from the uninterrupted run by {worst:.2e}")
    assert worst <= LOSS_TOLERANCE


def test_a_slow_upload_neither_times_out_nor_restarts(
    object_store: ObjectStore, s3_env: ObjectStore, tmp_path: Path
) -> None:
    """fsdp over 2 pods against the S3 server, pod 1 reaching it over a link throttled so that
    sending its share of one checkpoint (680 KB at 40 KB/s) outlasts the training steps'
    collective timeout. Steps never wait for it: the run trains through and succeeds. (Each
    file must still cross within s3fs's 15 s read timeout.)"""
    step_timeout = 10
    job = distributed_job(FSDP_ONE_EACH, lora=False)
    store = f"s3://{object_store.bucket()}/runs"
    with throttled(object_store.port, rate=40_000) as link:
        run = launch(
            job,
            tmp_path,
            store=store,
            training={"step_timeout_seconds": step_timeout},
            pod_env={0: object_store.env(), 1: object_store.env() | _through(link.port)},
        )
    run.assert_succeeded()
    report = TrainingReport.model_validate(run.summary())
    slow = per_rank(report)[1]
    print(
        f"pod 1 sent {slow.uploaded_bytes} bytes over the throttled link in "
        f"{slow.upload_seconds:.1f} s (step timeout {step_timeout} s), waited "
        f"{slow.wait_seconds:.1f} s for it after training; {link.forwarded} bytes crossed it"
    )
    assert report.step == STEPS
    assert slow.upload_seconds > 2 * step_timeout, "the upload outlasted the step timeout"
    assert link.forwarded >= slow.uploaded_bytes
    fs: Any = object_store.fs()
    assert fs.exists(f"{store}/checkpoints/checkpoint-{STEPS}/{COMPLETE_MARKER}")


def _through(port: int) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}


def test_a_hung_pod_fails_the_run_within_the_step_timeout(tmp_path: Path) -> None:
    """fsdp over 2 pods with a 10 s step timeout (startup keeps its long one): once training
    runs, pod 1 stops (SIGSTOP: a hung node, not a dead one). Pod 0 fails on the timeout in
    seconds instead of idling its GPUs for the old 30 minutes."""
    step_timeout = 10
    job = distributed_job(FSDP_ONE_EACH, lora=False)
    _, pods = prepare(
        job, tmp_path, training={"step_timeout_seconds": step_timeout, "max_steps": 10_000}
    )
    started = start_pods(pods, tmp_path)
    log = tmp_path / "pod-0.log"
    try:
        wait_while_running(started, tmp_path, logged(tmp_path, "step 3/"), "step 3")
        signal_pods(started[1:], signal.SIGSTOP)
        hung = time.monotonic()
        code = started[0].wait(timeout=step_timeout + 120)
        failed_after = time.monotonic() - hung
    finally:
        signal_pods(started, signal.SIGKILL)
    print(f"pod 0 exited {code} {failed_after:.1f} s after pod 1 hung")
    assert code != 0
    assert failed_after < step_timeout + 60
    assert f"Timed out waiting {step_timeout * 1000}ms" in log.read_text(errors="replace")


def test_sigterm_mid_training_saves_sends_and_resumes_from_that_save(
    runs: dict[tuple[str, str], Run], tmp_path: Path
) -> None:
    """fsdp over 2 pods without a shared disk: SIGTERM to each pod's first process (what the
    kubelet does on preemption) between periodic checkpoints. Every pod saves at the same step,
    sends its part and exits 143; new pods resume from that save and the losses go on as the
    uninterrupted run's."""
    job = distributed_job(FSDP_ONE_EACH, lora=False)
    _, pods = prepare(job, tmp_path, bucket=True)
    started = start_pods(pods, tmp_path)
    try:
        step = f"step {SAVE_STEPS + 1}/"
        wait_while_running(started, tmp_path, logged(tmp_path, step), step)
        for process in started:
            process.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in started]
    finally:
        signal_pods(started, signal.SIGKILL)
    assert codes == [EXIT_INTERRUPTED] * FSDP_ONE_EACH.nodes, codes
    bucket = tmp_path / "bucket" / "checkpoints"
    saved = max(
        (p for p in bucket.iterdir() if (p / COMPLETE_MARKER).exists()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    stopped_at = int(saved.name.split("-")[1])
    print(f"stopped by SIGTERM at step {stopped_at}; {saved.name} complete in the store")
    assert SAVE_STEPS < stopped_at < STEPS
    new_pods(tmp_path, FSDP_ONE_EACH.nodes)

    resumed = launch(job, tmp_path, bucket=True)
    resumed.assert_succeeded()
    assert re.search(rf"resuming from \S+/checkpoint-{stopped_at} ", resumed.log(0))
    worst = largest_difference(resumed, runs[("fsdp", "full")], range(stopped_at + 1, STEPS + 1))
    assert worst <= LOSS_TOLERANCE


# Each kind once, each direction once: a full fine-tune shrinking, a LoRA run growing (the
# other two pairings exercise the same resharding and took two minutes of every CI run).
@pytest.mark.parametrize(
    ("kind", "before", "after"),
    [("full", FSDP_TWO_PODS, FSDP), ("lora", FSDP, FSDP_TWO_PODS)],
    ids=["full-4-to-2", "lora-2-to-4"],
)
def test_a_run_resumes_at_another_world_size(
    runs: dict[tuple[str, str], Run],
    tmp_path: Path,
    kind: str,
    before: PodLayout,
    after: PodLayout,
) -> None:
    """Killed after checkpoint 4 at one world size, resumed in new pods at another: DCP
    reshards the model and optimizer, each rank fetching only its new rows; the scheduler and
    the data position go on (8 pairs a step either way), and the losses follow the
    uninterrupted run's."""
    lora = kind == "lora"
    crash(distributed_job(before, lora=lora, resizable=True), tmp_path, SAVE_STEPS, bucket=True)
    resumed = launch(distributed_job(after, lora=lora, resizable=True), tmp_path, bucket=True)
    resumed.assert_succeeded()
    log = resumed.log(0)
    assert re.search(rf"resuming from \S+/checkpoint-{SAVE_STEPS} ", log)
    assert f"written at world size {before.world_size}; resuming at {after.world_size}" in log
    baseline = runs[("fsdp", kind)]
    worst = largest_difference(resumed, baseline, range(SAVE_STEPS + 1, STEPS + 1))
    report = TrainingReport.model_validate(resumed.summary())
    fetched = [r.downloaded_bytes for r in per_rank(report)]
    print(
        f"{kind} {before.world_size} -> {after.world_size}: steps {SAVE_STEPS + 1}..{STEPS} "
        f"differ by {worst:.2e}; fetched per rank {fetched}"
    )
    assert worst <= LOSS_TOLERANCE
    assert learning_rates(resumed) == learning_rates(baseline), "the scheduler went on"
    assert report.step == STEPS
