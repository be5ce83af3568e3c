"""Benchmark: what each rank of a sharded run holds, phase by phase, on CPU over gloo.

Usage:
    python tools/bench_memory.py [--model llama-0.5b] [--worlds 1 2 4]

Trains a full fine-tune with a separate reference (accumulation 4, and 1 at the largest world
size) and a LoRA run, two optimizer steps each, with the process layouts `dpo run --cpu` starts
(one pod, one process per "GPU"). Prints MiB held per rank and phase beyond the process itself,
and MiB each rank read from the checkpoint; ends with one line:

    memory bench: world=4 load_node_over_copy=... ref_rank_over_shard=... ga4_over_ga1=...
    export_rank0_over_median=... plan_error=...

(the figures are defined in tests/distributed/memory.py). The memory tier of the tests runs the
same on the ~113M builtin:medium-llama; the default here is the ~0.5B builtin:llama-0.5b.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.distributed.conftest import PodLayout  # noqa: E402
from tests.distributed.memory import (  # noqa: E402
    Measured,
    figures,
    memory_job,
    run_measured,
    table,
    weights_bytes,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-0.5b", help="a builtin preset")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    largest = max(args.worlds)
    plans = [(f"full-{w}", w, False, 4) for w in args.worlds] + [
        (f"full-{largest}-ga1", largest, False, 1),
        (f"lora-{largest}", largest, True, 4),
    ]
    runs: dict[str, Measured] = {}
    with tempfile.TemporaryDirectory(prefix="dpo-bench-memory-") as scratch:
        for name, world, lora, accumulation in plans:
            layout = PodLayout("single", 1, 0) if world == 1 else PodLayout("fsdp", 1, world)
            job = memory_job(layout, lora=lora, accumulation=accumulation, model=args.model)
            print(f"running {name} ...", flush=True)
            runs[name] = run_measured(name, layout, job, Path(scratch) / name)
    print(f"\nbuiltin:{args.model}: {weights_bytes(args.model) / 2**20:.0f} MiB of fp32 weights")
    print("MiB held beyond the process itself, per rank and phase")
    print(table(list(runs.values())))
    for name, run in runs.items():
        held = max(run.held(r, "train") for r in run.ranks)
        print(
            f"{name}: training peak {held / 2**20:.0f} MiB per rank, planned "
            f"{run.planned_per_rank() / 2**20:.0f} MiB"
        )
    print(figures(runs[f"full-{largest}"], runs[f"full-{largest}-ga1"], args.model).line())


if __name__ == "__main__":
    main()
