#!/usr/bin/env bash
# On a GPU machine: `dpo run` (no --cpu) of an fsdp job over every visible GPU, for a LoRA run with
# precomputed reference log-probs and for a full fine-tune, then the gate and promotion. Prints
# what really ran (distributed type, mesh, world size, device) and the gate's verdict for each.
# Usage: tools/gpu_fsdp_check.sh [WORKDIR]     (needs the trainer's Python packages installed)
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:-$(mktemp -d)}"
gpus=$(nvidia-smi -L | grep -c '^GPU ')
echo "GPUs visible: $gpus"
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
