"""A model with Llama 3.1 70B's depth (80 decoder layers, 8 query heads per key/value head) at a
width a CPU trains in seconds, run as the 70B example runs it: a full fine-tune with a separate
reference, accumulation 8 and precomputed reference log-probs under hsdp, 2 pods x 2 processes
that share no disk. It trains, checkpoints, is killed, resumes on new pods, and exports a model
transformers loads."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from dpo_trainer.distributed import parameters_digest
from transformers import AutoModelForCausalLM

from tests.distributed.conftest import HSDP, crash, launch
from tests.distributed.memory import memory_job

DEPTH = "llama-70b-depth"


def test_a_70b_deep_full_finetune_trains_resumes_and_exports_under_hsdp(tmp_path: Path) -> None:
    job = memory_job(HSDP, lora=False, accumulation=8, model=DEPTH, steps=2, save_steps=1)
    crash(job, tmp_path, 1, bucket=True)

    resumed = launch(job, tmp_path, bucket=True)
    resumed.assert_succeeded()
    for pod in range(HSDP.nodes):
        assert re.search(r"resuming from \S+/checkpoints/checkpoint-1 ", resumed.log(pod))
    summary = resumed.summary()
    assert summary["step"] == 2
    assert summary["distributed"]["meshShape"] == [2, 2]
    reused = [r["split"] for r in summary["referenceLogProbs"]]
    assert reused == ["train"], "the resumed run precomputed again with its sharded reference"
    adapter = resumed.artifacts / "adapter"
    model = AutoModelForCausalLM.from_pretrained(adapter, dtype=torch.float32)
    assert model.config.num_hidden_layers == 80
    assert parameters_digest(model) == summary["parametersDigest"]
    read = [r["readBytes"] for r in summary["memoryByRank"]]
    print(f"80 layers, hsdp 2x2: read per rank {read} bytes; step 2 loss {resumed.losses()[2]}")
    assert len(set(read)) <= 2, "every rank read its slice (two shard positions)"
