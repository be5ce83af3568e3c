"""`dpo run --cpu` keeps the manifest's strategy: sharded training, the gate and promotion."""

from __future__ import annotations

from pathlib import Path

import pytest
from dpo_contract.manifest import verify_manifest
from dpo_trainer.publish.targets import read_current

from tests.conftest import dpo_run, promotion_target, quickstart


@pytest.mark.parametrize(
    ("resources", "strategy", "lora", "ran", "promoted_files"),
    [
        (
            {"nodes": 1, "gpusPerNode": 2},
            "fsdp",
            True,
            "FSDP2 sharded over 2 ranks, world size 2, parameters on cpu",
            {"adapter_config.json", "adapter_model.safetensors"},
        ),
        (
            {"nodes": 2, "gpusPerNode": 2},
            "hsdp",
            False,
            "FSDP2 sharded over a 2x2 mesh (dp_replicate, dp_shard_cp), world size 4, "
            "parameters on cpu",
            {"config.json", "model.safetensors.index.json", "tokenizer.json"},
        ),
    ],
    ids=["fsdp-lora", "hsdp-full-finetune"],
)
def test_dpo_run_cpu_trains_sharded_then_gates_and_promotes(
    tmp_path: Path,
    resources: dict[str, int],
    strategy: str,
    lora: bool,
    ran: str,
    promoted_files: set[str],
) -> None:
    manifest = quickstart(
        **{
            "resources.nodes": resources["nodes"],
            "resources.gpusPerNode": resources["gpusPerNode"],
            "parallelism.strategy": strategy,
            "peft.enabled": lora,
            "dpo.maxSteps": 30,
            "dpo.perDeviceBatchSize": 4,
        }
    )
    code, output = dpo_run(manifest, tmp_path, cpu=True)
    assert code == 0, output
    processes = resources["gpusPerNode"]
    assert f"  {strategy} on {resources['nodes']} pod(s) x {processes} cpu" in output
    assert f"ran        {ran}" in output
    assert "gate       Passed" in output
    current = read_current(str(promotion_target(tmp_path)))
    assert current is not None
    version = promotion_target(tmp_path) / "versions" / current.version
    assert promoted_files <= {p.name for p in version.iterdir()}
    assert verify_manifest(version) == current.digest
