"""FSDP2 (2 processes) and HSDP (2 pods x 2 processes) executed for real on CPU: what ran, parity
with one process, the whole artifact, one digest, and pods that share no disk."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from dpo_contract.manifest import MANIFEST, verify_manifest
from dpo_operator.core.plan import Layout, estimate, model_shape
from dpo_trainer.distributed import parameters_digest
from dpo_trainer.io.checkpoints import RANK_MARKERS
from dpo_trainer.io.models import model_location
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.distributed.conftest import (
    FSDP,
    LAYOUTS,
    STEPS,
    PodLayout,
    Run,
    distributed_job,
    launch,
)

# Per-step losses of a sharded run and one process seeing the same 8 pairs per step agree to
# this absolute tolerance: float32 reductions summed in a different order across ranks.
PARITY_TOLERANCE = 1e-5


@pytest.mark.parametrize(
    ("name", "mesh", "dims"),
    [("fsdp", [2], []), ("hsdp", [2, 2], ["dp_replicate", "dp_shard_cp"])],
)
def test_the_rendered_strategy_runs_as_fsdp2_and_is_recorded(
    runs: dict[tuple[str, str], Run], name: str, mesh: list[int], dims: list[str]
) -> None:
    layout = LAYOUTS[name]
    for kind in ("full", "lora"):
        run = runs[(name, kind)]
        ran = run.summary()["distributed"]
        print(f"{name} {kind}: {ran}")
        assert ran == {
            "distributedType": "FSDP",
            "fsdpVersion": 2,
            "meshShape": mesh,
            "meshDims": dims,
            "worldSize": layout.world_size,
            "device": "cpu",
        }
        assert run.termination()["distributed"] == ran, "the operator reads it from the pod too"


@pytest.mark.parametrize("name", ["fsdp", "hsdp"])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_sharded_losses_match_one_process(
    runs: dict[tuple[str, str], Run], name: str, kind: str
) -> None:
    single, sharded = runs[("single", kind)].losses(), runs[(name, kind)].losses()
    assert sorted(sharded) == list(range(1, STEPS + 1))
    worst = max(abs(sharded[step] - single[step]) for step in single)
    print(
        f"{name} {kind}: losses {[round(sharded[s], 5) for s in sorted(sharded)]}; largest "
        f"difference vs one process {worst:.2e} (tolerance {PARITY_TOLERANCE})"
    )
    assert worst <= PARITY_TOLERANCE
    assert sharded[STEPS] < sharded[1], "it learns"


def rank_digests(run: Run, layout: PodLayout) -> dict[int, str]:
    found = {}
    for pod in range(layout.nodes):
        for rank, digest in re.findall(r"rank (\d+): parameters digest (\w+)", run.log(pod)):
            found[int(rank)] = digest
    return found


@pytest.mark.parametrize("name", ["fsdp", "hsdp"])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_every_rank_computes_the_same_digest_over_full_tensors(
    runs: dict[tuple[str, str], Run], name: str, kind: str
) -> None:
    run, layout = runs[(name, kind)], LAYOUTS[name]
    digests = rank_digests(run, layout)
    assert sorted(digests) == list(range(layout.world_size)), "every rank reported"
    assert set(digests.values()) == {run.summary()["parametersDigest"]}


@pytest.mark.parametrize("name", ["fsdp", "hsdp"])
def test_a_sharded_full_finetune_is_saved_whole_and_loads_with_transformers(
    runs: dict[tuple[str, str], Run], name: str
) -> None:
    run = runs[(name, "full")]
    adapter = run.artifacts / "adapter"
    model, info = AutoModelForCausalLM.from_pretrained(
        adapter, dtype=torch.float32, output_loading_info=True
    )
    print(f"{name}: {sorted(p.name for p in adapter.iterdir())}; loading info {info}")
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert parameters_digest(model) == run.summary()["parametersDigest"], "tensors as trained"
    assert (adapter / "tokenizer.json").exists(), "a full fine-tune ships its tokenizer"


@pytest.mark.parametrize("name", ["fsdp", "hsdp"])
def test_a_sharded_lora_run_leaves_an_adapter_peft_loads(
    runs: dict[tuple[str, str], Run], name: str
) -> None:
    run = runs[(name, "lora")]
    base = AutoModelForCausalLM.from_pretrained(
        model_location(run.config.model), dtype=torch.float32
    )
    model = PeftModel.from_pretrained(base, run.artifacts / "adapter", is_trainable=True)
    assert parameters_digest(model) == run.summary()["parametersDigest"], "tensors as trained"


@pytest.mark.parametrize("name", ["fsdp", "hsdp"])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_the_manifest_covers_every_file_of_the_artifact(
    runs: dict[tuple[str, str], Run], name: str, kind: str
) -> None:
    adapter = runs[(name, kind)].artifacts / "adapter"
    files = {str(p.relative_to(adapter)) for p in adapter.rglob("*") if p.is_file()}
    listed = set(json.loads((adapter / MANIFEST).read_text())["files"])
    assert listed == files - {MANIFEST}
    assert verify_manifest(adapter) == runs[(name, kind)].summary()["adapterDigest"]


def test_pods_without_a_shared_disk_put_every_shard_of_every_checkpoint_in_the_store(
    runs: dict[tuple[str, str], Run],
) -> None:
    run = runs[("hsdp", "full")]
    store = run.artifacts / "checkpoints"
    checkpoints = sorted(p.name for p in store.iterdir())
    assert checkpoints == ["checkpoint-4", "checkpoint-8"]
    for checkpoint in checkpoints:
        for part in ("pytorch_model_fsdp_0", "optimizer_0"):
            shards = sorted(p.name for p in (store / checkpoint / part).glob("*.distcp"))
            assert shards == [f"__{rank}_0.distcp" for rank in range(4)], (checkpoint, part)
        assert sorted(p.name for p in (store / checkpoint).glob("rng_state_*.pth")) == [
            f"rng_state_{rank}.pth" for rank in range(4)
        ]
    # Each rank sent only the shards it wrote (its marker lists them): the store joined them.
    for rank in range(4):
        marker = json.loads((store / "checkpoint-8" / RANK_MARKERS / f"{rank}.json").read_text())
        shards = sorted(Path(f).name for f in marker["files"] if f.endswith(".distcp"))
        assert shards == [f"__{rank}_0.distcp"] * 2, (rank, shards)
    # Once sent, a pod's disk keeps none of it.
    for pod in range(2):
        mirror = next((run.workdir / f"pod-{pod}" / "tmp" / "dpo-artifacts").iterdir())
        assert not [p for p in (mirror / "checkpoints").glob("checkpoint-*/**/*") if p.is_file()]


def test_a_launcher_that_drops_fsdp_stops_the_run_instead_of_training_ddp(tmp_path: Path) -> None:
    """The FSDP config handed to a launcher that drops it (accelerate's MULTI_GPU on CPU runs
    plain DDP) stops the run before the first step, saying what ran instead."""
    job = distributed_job(FSDP, lora=True)
    workdir = tmp_path / "tampered"
    run = launch(job, workdir, tamper_accelerate={"distributed_type": "MULTI_GPU"})
    assert run.codes == [4]
    message = run.termination()["message"]
    print(message)
    assert "renders fsdp on 1 node(s) x 2 cpu process(es)" in message
    assert "distributed type MULTI_CPU (expected FSDP)" in message
    assert not (run.artifacts / "adapter").exists()


@pytest.mark.parametrize("name", ["single", "fsdp", "hsdp"])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_the_memory_plan_matches_the_model_states_each_rank_really_holds(
    runs: dict[tuple[str, str], Run], name: str, kind: str
) -> None:
    """The plan's weights, gradients and optimizer parts (fp32 here: CPU) against the bytes rank 0
    held of parameters, trainable parameters and AdamW states after its first step."""
    run, layout = runs[(name, kind)], LAYOUTS[name]
    job = distributed_job(layout, lora=kind == "lora")
    shape = model_shape(job.spec)
    assert shape is not None
    rendered = run.config.distributed
    shard = {"single": 1, "fsdp": rendered.world_size, "hsdp": rendered.shard_group_size}[name]
    assert shard is not None
    planned = estimate(job.spec, shape, Layout(rendered.strategy, shard), 0, device="cpu").parts
    measured = run.summary()["memory"]
    pairs = {
        "weights": measured["parameterBytes"],
        "gradients": measured["trainableBytes"],
        "optimizer": measured["optimizerBytes"],
    }
    for part, actual in pairs.items():
        print(f"{name} {kind} {part}: planned {planned[part]} bytes, measured {actual}")
        assert actual == pytest.approx(planned[part], rel=0.02), part
    assert measured["peakBytes"] > measured["parameterBytes"]
