#!/usr/bin/env bash
# On a GPU machine: the fabric preflight over every visible GPU, then `dpo run` (no --cpu) of an
# fsdp job over every visible GPU, for a LoRA run with precomputed reference log-probs and for a
# full fine-tune, then the gate and promotion. Prints
# what really ran (distributed type, mesh, world size, device) and the gate's verdict for each.
# Then the memory each rank held, phase by phase, with torch.cuda.max_memory_allocated, printed
# under `dpo plan`'s per-GPU estimate for the same job.
# Usage: tools/gpu_fsdp_check.sh [WORKDIR]     (needs the trainer's Python packages installed)
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:-$(mktemp -d)}"
gpus=$(nvidia-smi -L | grep -c '^GPU ')
echo "GPUs visible: $gpus"

# The fabric first: the preflight every run starts with, alone, over every GPU (NVLink within
# this node): bus bandwidth per size as nccl-tests computes it, NCCL's transport as its own log
# says, next to the H200's NVLink figure. One GPU: nothing crosses a link (0 by definition).
echo "== fabric preflight over $gpus GPU(s)"
torchrun --nproc-per-node "$gpus" -m dpo_trainer.cli preflight --max-mib 1024 2>&1 |
  grep -vE "^(W|I)[0-9]{4} |^\*+$|OMP_NUM_THREADS"
for kind in lora full; do
  manifest="$workdir/fsdp-$kind.yaml"
  python3 - "$manifest" "$gpus" "$kind" <<'EOF'
import sys
import yaml

path, gpus, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
job = yaml.safe_load(open("examples/quickstart.yaml"))
job["metadata"]["name"] = f"gpu-fsdp-{kind}"
spec = job["spec"]
spec["model"]["name"] = "builtin:small-llama"
spec["resources"].update({"gpusPerNode": gpus, "memory": "64Gi", "shmSize": "8Gi"})
spec["parallelism"] = {"strategy": "fsdp"}
spec["peft"]["enabled"] = kind == "lora"
spec["dpo"]["precomputeRefLogProbs"] = kind == "lora"
spec["dpo"]["learningRate"] = 1e-4
yaml.safe_dump(job, open(path, "w"))
EOF
  echo "== fsdp over $gpus GPU(s), $kind"
  dpo run "$manifest" --workdir "$workdir/$kind" | grep -E "^(Training|ran|gate|promoted|DPOJob)|bad input|not what"
done

# Memory per rank, phase by phase, next to the plan: a full fine-tune with a separate reference
# (precomputed) and accumulation 4 over every GPU, of a model with Llama 3.1 8B's layers
# (MEMORY_MODEL=<builtin preset> to change it; building it the first time takes minutes).
memory_model="${MEMORY_MODEL:-llama-8b-layers}"
manifest="$workdir/memory.yaml"
python3 - "$manifest" "$gpus" "$memory_model" <<'EOF2'
import sys
import yaml

path, gpus, model = sys.argv[1], int(sys.argv[2]), sys.argv[3]
job = yaml.safe_load(open("examples/quickstart.yaml"))
job["metadata"]["name"] = "gpu-memory"
spec = job["spec"]
spec["model"] = {"name": f"builtin:{model}", "reference": {"name": f"builtin:{model}"}}
spec["data"] = {"train": {"uri": "builtin:synthetic-preferences/train?n=256&words=32"}}
spec["resources"].update({"gpusPerNode": gpus, "memory": "120Gi", "shmSize": "8Gi"})
spec["parallelism"] = {"strategy": "fsdp" if gpus > 1 else "auto"}
spec["peft"]["enabled"] = False
spec["dpo"].update(
    {
        "maxSteps": 4,
        "saveSteps": 4,
        "perDeviceBatchSize": 2,
        "gradientAccumulationSteps": 4,
        "maxLength": 160,
        "learningRate": 1e-6,
        "precomputeRefLogProbs": True,
    }
)
yaml.safe_dump(job, open(path, "w"))
EOF2
echo "== memory per rank: builtin:$memory_model, full fine-tune + reference over $gpus GPU(s)"
dpo plan "$manifest" | sed -n '1,/choice/p'
dpo run "$manifest" --workdir "$workdir/memory" >"$workdir/memory.log" 2>&1 || {
  tail -40 "$workdir/memory.log"
  exit 1
}
python3 - "$workdir/memory" <<'EOF2'
import json
import sys
from pathlib import Path

report = json.loads(next(Path(sys.argv[1]).rglob("train.json")).read_text())
print("GiB per rank: device peak (torch.cuda.max_memory_allocated) | host peak, by phase")
phases = ("load", "reference", "train", "export")
print("rank " + "".join(f"{p:>22}" for p in phases) + "   read GiB")
for rank in report["memoryByRank"]:
    cells = ""
    for phase in phases:
        got = rank["phases"].get(phase)
        cells += (
            f"{got['devicePeakBytes'] / 2**30:>12.2f} | {got['peakBytes'] / 2**30:6.2f}"
            if got
            else f"{'-':>22}"
        )
    print(f"{rank['rank']:>4} {cells}   {rank['readBytes'] / 2**30:8.2f}")
print("mixed precision:", report.get("mixedPrecision"))
EOF2
