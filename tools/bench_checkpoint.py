"""Benchmark: a sharded run's checkpoints in a real S3 server (SeaweedFS), no shared disk.

Usage:
    python tools/bench_checkpoint.py [--model medium-llama] [--steps 4]

Trains a full fine-tune with fsdp over 2 pods x 2 processes (world size 4), three times: once
through; once killed as soon as its checkpoint at half the steps is complete; and resumed from
that checkpoint in new pods, 1 pod x 2 processes (world size 2: dpo.globalBatchSize keeps 4
pairs a step, accumulating twice). Prints what each rank sent and fetched and how long its saves
held training, and ends with one line:

    checkpoint bench: world=4 upload_per_rank_over_total=... download_per_rank_over_total=...
    save_s=... longest_collective_wait_s=... resumed_world=2 resumed_loss_delta=...

- upload_per_rank_over_total: the most a rank sent of one checkpoint, over its size (an even
  share is 1/4; rank 0 also sends the small files every rank reads);
- download_per_rank_over_total: the most a resumed rank fetched, over the checkpoint's size (an
  even share at world size 2 is 1/2);
- save_s: how long a save held training (the median over ranks of each one's longest);
  longest_collective_wait_s: the longest a rank waited in a collective on checkpoint I/O, which
  is the longest save (DCP's save is a collective; uploads run beside training, outside any);
- resumed_loss_delta: the largest difference between the resumed run's losses and the
  uninterrupted run's, over the steps after the checkpoint.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpo_contract.reports import TrainingReport  # noqa: E402
from dpo_trainer.io.checkpoints import COMPLETE_MARKER, RANK_MARKERS  # noqa: E402

from tests.conftest import job_with  # noqa: E402
from tests.distributed.conftest import PodLayout, Run, crash, launch  # noqa: E402
from tests.object_store import ObjectStore  # noqa: E402
from tests.trainer.conftest import TINY_SPEC  # noqa: E402

BEFORE = PodLayout("fsdp", 2, 2)
AFTER = PodLayout("fsdp", 1, 2)
GLOBAL_BATCH = 4


def bench_job(layout: PodLayout, model: str, steps: int) -> Any:
    return job_with(
        **{
            **TINY_SPEC,
            "model": {"name": f"builtin:{model}"},
            "data": {"train": {"uri": "builtin:synthetic-preferences/train?n=64"}},
            "evalGate": {"enabled": False},
            "resources": {"nodes": layout.nodes, "gpusPerNode": layout.gpus_per_node},
            "parallelism": {"strategy": layout.strategy},
            "peft": {"enabled": False},
            "dpo": {
                "maxSteps": steps,
                "saveSteps": steps // 2,
                "loggingSteps": 1,
                "perDeviceBatchSize": 1,
                "globalBatchSize": GLOBAL_BATCH,
                "maxLength": 32,
                "learningRate": 1e-5,
            },
        }
    )


def checkpoint_bytes(store: Any, folder: str) -> int:
    return sum(
        int(info["size"])
        for path, info in store.find(folder, detail=True).items()
        if f"/{RANK_MARKERS}/" not in path and not path.endswith(COMPLETE_MARKER)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="medium-llama", help="a builtin preset")
    parser.add_argument("--steps", type=int, default=4, help="even: it checkpoints at half")
    args = parser.parse_args()
    saved_at = args.steps // 2
    with tempfile.TemporaryDirectory(prefix="dpo-bench-checkpoint-") as scratch:
        root = Path(scratch)
        (root / "store").mkdir()
        object_store = ObjectStore.start(root / "store")
        try:
            os.environ.update(object_store.env())
            store = object_store.fs()
            env = {rank: object_store.env() for rank in range(BEFORE.nodes)}

            def run(name: str, layout: PodLayout, bucket: str, **options: Any) -> Run:
                print(f"running {name} ...", flush=True)
                return launch(
                    bench_job(layout, args.model, args.steps),
                    root / bucket,
                    store=f"s3://{bucket}/runs",
                    pod_env=env,
                    **options,
                )

            through_bucket, resumed_bucket = object_store.bucket(), object_store.bucket()
            through = run("uninterrupted, world 4", BEFORE, through_bucket)
            through.assert_succeeded()
            print(f"running killed after checkpoint {saved_at}, world 4 ...", flush=True)
            crash(
                bench_job(BEFORE, args.model, args.steps),
                root / resumed_bucket,
                saved_at,
                store=f"s3://{resumed_bucket}/runs",
                pod_env=env,
            )
            resumed = run("resumed, world 2", AFTER, resumed_bucket)
            resumed.assert_succeeded()

            first = TrainingReport.model_validate(through.summary())
            second = TrainingReport.model_validate(resumed.summary())
            prefix = f"{through_bucket}/runs"
            (folder,) = {
                p.rsplit("/checkpoints/", 1)[0]
                for p in store.find(prefix)
                if f"/checkpoints/checkpoint-{args.steps}/" in p
            }
            total = checkpoint_bytes(store, f"{folder}/checkpoints/checkpoint-{args.steps}")
            resumed_from = checkpoint_bytes(
                store,
                next(
                    p.rsplit("/", 1)[0]
                    for p in store.find(f"{resumed_bucket}/runs")
                    if p.endswith(f"/checkpoint-{saved_at}/{COMPLETE_MARKER}")
                ),
            )
        finally:
            object_store.stop()
    ranks = first.checkpoints_by_rank
    saves = [r.longest_save_seconds for r in ranks]
    print(f"\nbuiltin:{args.model}, checkpoint {args.steps}: {total / 2**20:.1f} MiB")
    print("rank  sent MiB  saves  longest save s  upload s")
    for rank in ranks:
        print(
            f"{rank.rank:>4}  {rank.uploaded_bytes / rank.saves / 2**20:>8.1f}  {rank.saves:>5}  "
            f"{rank.longest_save_seconds:>14.2f}  {rank.upload_seconds:>8.2f}"
        )
    print(f"resumed at world 2 from checkpoint {saved_at} ({resumed_from / 2**20:.1f} MiB):")
    for rank in second.checkpoints_by_rank:
        print(f"{rank.rank:>4}  fetched {rank.downloaded_bytes / 2**20:.1f} MiB")
    expected = {e["step"]: e["loss"] for e in first.log_history if "loss" in e}
    actual = {e["step"]: e["loss"] for e in second.log_history if "loss" in e}
    delta = max(abs(actual[s] - expected[s]) for s in range(saved_at + 1, args.steps + 1))
    print(
        f"checkpoint bench: world={BEFORE.world_size} "
        f"upload_per_rank_over_total={max(r.uploaded_bytes / r.saves for r in ranks) / total:.2f} "
        f"download_per_rank_over_total="
        f"{max(r.downloaded_bytes for r in second.checkpoints_by_rank) / resumed_from:.2f} "
        f"save_s={statistics.median(saves):.2f} longest_collective_wait_s={max(saves):.2f} "
        f"resumed_world={AFTER.world_size} resumed_loss_delta={delta:.2e}"
    )


if __name__ == "__main__":
    main()
